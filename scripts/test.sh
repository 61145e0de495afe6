#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: real Ray, real vLLM (CPU), the real embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
bash scripts/setup.sh
bash scripts/setup_openclaw.sh   # Node 24 and the real openclaw package, for the plugin's tests
# The dashboard is tested in headless Chromium (Debian's package; the tests run as root in CI).
if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# The journal's contract runs on a real PostgreSQL server too (Debian's package; started by the tests on 127.0.0.1).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
exec .venv/bin/python -m pytest -v --durations=15 "$@"
