#!/usr/bin/env bash
# Install the `ws` package for bench/node_floor.js into <repo>/.tools/node-floor
# (gitignored); a no-op when it is there. Needs node and npm.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$REPO/.tools/node-floor"
if [ ! -f "$PREFIX/node_modules/ws/package.json" ]; then
    mkdir -p "$PREFIX"
    [ -f "$PREFIX/package.json" ] || echo '{"name":"node-floor","private":true}' > "$PREFIX/package.json"
    npm install --prefix "$PREFIX" --no-save --no-audit --no-fund --loglevel=error ws@8 >&2
fi
