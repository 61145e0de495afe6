#!/usr/bin/env bash
# The full evaluation on the embedded model: start the app from configs/local.yaml in a fresh local Ray
# cluster, teach every shipped preference for 8 feedback events through the API, then the ordered pairs of
# benchmarks/eval_full.yaml, and write the report (report.json, summary.md, compliance.png,
# accumulation.png) to reports/eval_full/.
#   bash benchmarks/eval_full.sh [extra `claas-ray eval` arguments]
# The pairs alone (16 minutes on two cores in bf16, 2026-12-02; 48 in fp32):
#   CLAAS_RAY_EVAL_CONFIG=benchmarks/eval_accumulation.yaml CLAAS_RAY_EVAL_OUTPUT=reports/eval_accumulation \
#     bash benchmarks/eval_full.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
PORT="${CLAAS_RAY_EVAL_PORT:-8011}"
OUT="${CLAAS_RAY_EVAL_OUTPUT:-reports/eval_full}"
# A fresh store and state, so the run does not mix with adapters of an earlier one.
export CLAAS_RAY__STORE__ROOT="$(mktemp -d)/adapters" CLAAS_RAY__STATE_DIR="$(mktemp -d)/state"

.venv/bin/claas-ray serve --config configs/local.yaml --address local --port "$PORT" &
SERVER=$!
# SIGTERM: a background job of a non-interactive shell ignores SIGINT.
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "claas-ray serve exited" >&2; exit 1; }
  sleep 1
done
.venv/bin/claas-ray eval --url "http://127.0.0.1:$PORT" --config "${CLAAS_RAY_EVAL_CONFIG:-benchmarks/eval_full.yaml}" --output "$OUT" "$@"
