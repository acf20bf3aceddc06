#!/usr/bin/env bash
# Set up .venv if needed, then run the main job on the embedded default model: a small tuning
# study (SmolLM2-135M-Instruct, 30 FreebaseQA questions, 40 trials with successive halving, 2 at a
# time, embedded Ray, ~15 minutes on 2 cores) that ends with the Pareto table, the trials per hour
# and, in its last lines, the recommendation's verdict: the fastest policy that is faster than
# dense within the quality drop (both at 95%), or dense with the reason. Results go to
# ./ffnskip.db (study "smollm2-factoid"; rerunning resumes it, or just prints the verdict again
# when it is finished). Extra arguments are passed to `python -m tuning`.
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
