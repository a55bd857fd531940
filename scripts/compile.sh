#!/usr/bin/env bash
# Compile the request path in place with mypyc (setup.py lists the modules), so the
# tests, the demo and bench/ run the compiled build the container image ships.
#   bash scripts/compile.sh           compile (uses .venv, as scripts/test.sh makes it; needs gcc
#                                     and Python's headers)
#   bash scripts/compile.sh --clean   remove the compiled modules: pure Python again
# A compiled module shadows its .py: after editing any source, compile again or clean.
# The sidecar warns at startup, and tests/conftest.py refuses to run, when a source changed
# since (sidecar/buildinfo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
find sidecar -name '*.so' -delete
rm -rf build sidecar/.compiled-sources.json
if [ "${1:-}" = "--clean" ]; then
  exit 0
fi
PY=${PY:-.venv/bin/python}
# mypy (the compiler) and setuptools come with the dev extra.
"$PY" -c "import setuptools, mypyc" 2>/dev/null || "$PY" -m pip install --quiet -e '.[dev]'
SIDECAR_COMPILE=1 "$PY" -W ignore setup.py --quiet build_ext --inplace >/dev/null
"$PY" -m sidecar.buildinfo --record
