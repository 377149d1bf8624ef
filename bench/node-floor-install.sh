#!/usr/bin/env bash
# Install the packages bench/node_floor.js uses into <repo>/.tools/node-floor
# (gitignored): `ws`, and for --original-steps `write-file-atomic`, at the major
# versions the original sidecar's package.json asks for. A no-op when both are
# there. Needs node and npm.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="$REPO/.tools/node-floor"
if [ ! -f "$PREFIX/node_modules/ws/package.json" ] || [ ! -f "$PREFIX/node_modules/write-file-atomic/package.json" ]; then
    mkdir -p "$PREFIX"
    [ -f "$PREFIX/package.json" ] || echo '{"name":"node-floor","private":true}' > "$PREFIX/package.json"
    npm install --prefix "$PREFIX" --no-save --no-audit --no-fund --loglevel=error ws@8 write-file-atomic@5 >&2
fi
