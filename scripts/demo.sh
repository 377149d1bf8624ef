#!/usr/bin/env bash
# Set up the venv and package, then run `sidecar demo`: the dev hub, a sidecar, and a few tasks, live.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/sidecar demo "$@"
