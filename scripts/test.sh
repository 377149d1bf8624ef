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
# bubblewrap lets the agentic run_command jail tests run (they skip without it).
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get install -y -qq bubblewrap >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; }) \
            || echo "WARNING: bubblewrap could not be installed; the bwrap sandbox tests will skip" >&2
    else
        echo "NOTE: no bwrap on PATH; the bwrap sandbox tests will skip (apt-get install bubblewrap)" >&2
    fi
fi
.venv/bin/ruff check sidecar tests bench
.venv/bin/mypy
# pytest exits 5 when it collects no tests, so an empty run fails too.
.venv/bin/pytest -q "$@"
