#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on an H200): the GPU test subset, then training
# throughput / MFU at the iwslt2017_de_en model size and beam-5 decoding speed.
#   scripts/gpu_check.sh          # on a GPU machine
#   scripts/gpu_check.sh --cpu    # smoke run of the same script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "${1:-}" = "--cpu" ]; then
    "$PY" -m pytest -q tests/test_gpu.py
    "$PY" scripts/gpu_check.py --cpu
else
    "$PY" -m pytest -q tests/test_gpu.py tests/test_model.py tests/test_search.py
    "$PY" scripts/gpu_check.py --compile
fi
