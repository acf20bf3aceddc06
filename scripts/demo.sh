#!/usr/bin/env bash
# Set up .venv if needed, then run the main job on the embedded default model: a small tuning
# study (SmolLM2-135M-Instruct, FreebaseQA, 12 trials, 2 at a time, embedded Ray) that ends by
# printing the Pareto table and the best policy. Results go to ./ffnskip.db (study
# "smollm2-factoid"; rerunning resumes it). Extra arguments are passed to `python -m tuning`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

export RAY_AUTH_MODE=disabled
export HF_HUB_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1

args=(--config tuning/configs/smollm2-factoid.yaml --db "${FFNSKIP_DB_URL:-sqlite:///ffnskip.db}")
if .venv/bin/ffnskip results studies --db "${FFNSKIP_DB_URL:-sqlite:///ffnskip.db}" --json 2>/dev/null \
    | grep -q '"smollm2-factoid"'; then
  args+=(--resume)  # idempotent: a finished study runs nothing new and prints its results again
fi
exec .venv/bin/python -m tuning "${args[@]}" "$@"
