#!/usr/bin/env bash
# Set up .venv if needed, then show ffnskip on the default model (smollm2-135m, CPU is fine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

export RAY_AUTH_MODE=disabled
export HF_HUB_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1

.venv/bin/ffnskip generate "The capital of France is"
.venv/bin/ffnskip profile --tokens 256
