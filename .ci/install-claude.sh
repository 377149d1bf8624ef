#!/usr/bin/env bash
# Install the Claude Code CLI locally (into <repo>/.tools/claude, gitignored) for the
# CLI tests, and print the path of the binary.
#
#   .ci/install-claude.sh            # pinned version below
#   CLAUDE_CODE_VERSION=x.y.z .ci/install-claude.sh
#
# The npm package ships a native binary per platform as an optional dependency
# (@anthropic-ai/claude-code-linux-x64 etc.) and its postinstall links it into
# bin/claude.exe, so optional dependencies and install scripts must stay enabled.
set -euo pipefail

VERSION="${CLAUDE_CODE_VERSION:-2.1.331}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$REPO/.tools/claude"
BIN="$PREFIX/node_modules/.bin/claude"

mkdir -p "$PREFIX"
if [ ! -f "$PREFIX/package.json" ]; then
    echo '{"name":"sidecar-test-tools","private":true}' > "$PREFIX/package.json"
fi

if ! "$BIN" --version 2>/dev/null | grep -q "^$VERSION"; then
    npm install --prefix "$PREFIX" --no-save --include=optional --no-audit --no-fund \
        --loglevel=error "@anthropic-ai/claude-code@$VERSION" >&2
fi

# Check it really runs (a missing platform package shows up here, not at install time).
if ! out="$("$BIN" --version 2>&1)"; then
    echo "installed, but '$BIN --version' failed:" >&2
    echo "$out" >&2
    exit 1
fi
echo "claude $out" >&2
echo "$BIN"
