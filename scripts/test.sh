#!/usr/bin/env bash
# Set up .venv if needed, start the services the tests need, run pytest (args are passed on).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

export RAY_AUTH_MODE=disabled
export HF_HUB_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1

# --- services -------------------------------------------------------------------------------
# PostgreSQL start-up goes here (to be added), before pytest runs.
# ---------------------------------------------------------------------------------------------

# --durations: the 30 slowest tests at the end of every run, to keep the suite within its 30 minutes
exec .venv/bin/python -m pytest -q --durations=30 "$@"
