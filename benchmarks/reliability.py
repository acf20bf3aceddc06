"""The reliability drills (issue 16) in one command, their figures side by side.

    RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reliability.py

Runs ``tests/test_reliability_study.py`` and ``tests/test_reliability_serve.py`` with pytest
(extra arguments go to pytest, e.g. ``-k fuzz``); each drill writes one JSON line of figures to
a fresh file (``$FFNSKIP_RELIABILITY_OUT``), printed here as the README's Reliability table
(``--json``: the lines as one JSON array). Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_reliability_study.py", "tests/test_reliability_serve.py"]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def row(fig: dict) -> str:
    drill = fig.pop("drill")
    return f"| {drill} | " + ", ".join(f"{k} {json.dumps(v)}" for k, v in sorted(fig.items())) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="the figures as one JSON array")
    args, pytest_args = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="ffnskip-rel-") as d:
        out = Path(d) / "figures.jsonl"
        env = dict(os.environ, FFNSKIP_RELIABILITY_OUT=str(out))
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env.setdefault("HF_HUB_OFFLINE", "1")
        started = time.monotonic()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", *TESTS, *pytest_args], cwd=ROOT,
                            env=env).returncode
        wall = time.monotonic() - started
        figures = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if args.json:
        print(json.dumps(figures))
        return rc
    print(f"\nreliability drills: {len(figures)} rows in {wall:.0f} s on {cpu_model()} ({os.cpu_count()} CPUs), "
          f"pytest exit status {rc}\n")
    print("| drill | measured |")
    print("|---|---|")
    for fig in figures:
        print(row(dict(fig)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
