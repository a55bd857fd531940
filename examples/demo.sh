#!/bin/sh
# The demo in one command, from a fresh clone, offline once installed:
#   examples/demo.sh [--mode route|proxy|zero-change|all] [--show-logs]
# Creates .venv if missing, installs this project with its demo extra, then runs
# examples/demo/run_demo.py (Polygon stub, credential sidecar, fininfo MCP server,
# MCP client; and an unchanged requests app through HTTPS_PROXY with interception),
# which exits non-zero if any expectation fails. The default runs every path.
set -eu

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "demo.sh: $PYTHON is older than Python 3.11; set PYTHON=python3.11 (or newer)" >&2
        exit 1
    fi
    echo "Creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi

echo "Installing mcp-credential-sidecar[demo] into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[demo]'

exec .venv/bin/python examples/demo/run_demo.py "$@"
