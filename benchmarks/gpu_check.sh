#!/usr/bin/env bash
# GPU check (run on a machine with CUDA, from the repository root, after scripts/setup.sh or with
# the requirements installed): the speed benchmark in bf16 and the exactness tests, < 5 minutes.
# Writes everything to ${OUT:-out/gpu}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
POLICY='{"mode": "adaptive", "threshold": -1, "layer_start": 5, "layer_end": 25, "warmup_tokens": 4, "skip_budget": 9, "dense_every": 0}'
for bs in 1 8; do
  "$PY" -m ffnskip.cli bench speed --model smollm2-135m --device cuda --dtype bfloat16 \
    --policy-json "$POLICY" --batch-size "$bs" --new-tokens 64 --repeats 3 --json | tee "$OUT/bench_bs$bs.json"
done
# The lagged adaptive rule (one host synchronisation per token) at a realistic threshold.
LAGGED='{"mode": "adaptive", "lagged": true, "threshold": 0.9, "layer_start": 5, "layer_end": 25, "warmup_tokens": 4, "skip_budget": 9, "dense_every": 0}'
"$PY" -m ffnskip.cli bench speed --model smollm2-135m --device cuda --dtype bfloat16 \
  --policy-json "$LAGGED" --new-tokens 64 --repeats 3 --json | tee "$OUT/bench_lagged.json"
# Exactness on the GPU: the engine tests with CUDA visible (tiny models run on CPU tensors; the
# real-model tests load on the default device), and tests/test_sync.py, whose CUDA test decodes
# under torch.cuda.set_sync_debug_mode("error"): any uncounted host synchronisation fails it.
"$PY" -m pytest -q -rs tests/test_engine.py tests/test_sync.py tests/test_real_model.py 2>&1 | tee "$OUT/tests.txt"
