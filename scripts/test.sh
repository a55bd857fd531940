#!/usr/bin/env bash
# Set up .venv (if needed) with everything the tests use, then run the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k proxy`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev,demo]'
exec .venv/bin/python -m pytest "$@"
