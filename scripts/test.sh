#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: real Ray, real vLLM (CPU), the real embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
bash scripts/setup.sh
exec .venv/bin/python -m pytest -v --durations=15 "$@"
