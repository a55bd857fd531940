#!/usr/bin/env bash
# Compile the request path in place with mypyc (setup.py lists the modules), so the
# tests, the demo and bench/ run the compiled build the container image ships.
#   bash scripts/compile.sh           compile (needs .venv from scripts/test.sh, and gcc)
#   bash scripts/compile.sh --clean   remove the compiled modules: pure Python again
# A compiled module shadows its .py: after editing one, compile again or clean.
# (tests/conftest.py refuses to run against a module compiled before its last edit.)
set -euo pipefail
cd "$(dirname "$0")/.."
find sidecar -name '*.so' -delete
rm -rf build
if [ "${1:-}" = "--clean" ]; then
  exit 0
fi
PY=${PY:-.venv/bin/python}
# setuptools is not in a Python 3.12+ venv by default; mypy comes with the dev extra.
"$PY" -c "import setuptools, mypyc" 2>/dev/null || "$PY" -m pip install --quiet "setuptools>=68" "mypy>=1.10"
SIDECAR_COMPILE=1 "$PY" -W ignore setup.py --quiet build_ext --inplace >/dev/null
"$PY" -c 'import sidecar; print("compiled:", " ".join(sidecar.compiled_modules()))'
