#!/usr/bin/env bash
# Set up (venv, package, test tools, the real Claude Code CLI) and run every check:
# ruff, mypy --strict, and the pytest suite (soak runs excluded; select them with -m soak).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
if ! bash .ci/install-claude.sh; then
    echo "WARNING: the Claude Code CLI could not be installed from npm; tests that drive the real CLI will skip" >&2
fi
.venv/bin/ruff check sidecar tests bench
.venv/bin/mypy
# pytest exits 5 when it collects no tests, so an empty run fails too.
.venv/bin/pytest -q "$@"
