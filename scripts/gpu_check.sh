#!/usr/bin/env bash
# The one-shot GPU check (scripts/gpu_check.py says what it measures). On the lent GPU machine:
#   scripts/gpu_check.sh            # asserts a GPU; everything is also logged to $OUT/gpu_check.log
#   scripts/gpu_check.sh --cpu      # the same sequence on this CPU, small sizes
# No `set -e`: each part runs even when one before it failed; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
# The GPU machine has torch but not this package: import it from the working tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" scripts/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
