"""Every speed figure of the README's Performance section side by side, in one command.

For each dtype (fp32, bf16 by default) and batch size (1, 8): transformers ``generate`` (a),
ffnskip dense (b) and ffnskip with a policy (c) -- :func:`ffnskip.bench.bench_speed`, the same
alternating measurement as ``ffnskip bench speed`` -- then one table::

    .venv/bin/python benchmarks/speed.py                       # SmolLM2-135M, fp32 + bf16, bs 1 + 8
    .venv/bin/python benchmarks/speed.py --policy-json '{"threshold": 0.95, ...}' --json

The policy defaults to the Performance issue's fp32 policy (``threshold: -1``, 28% FFNs skipped);
``--calibrated`` adds a row per setting for a calibrated threshold (the README's); ``--compiled``
adds, per row, the same measurement with the compiled decode layer (``ffnskip.compiled``,
``FFNSKIP_COMPILE=1``), compiled before it is timed. Prints the CPU
(model name and the ISA torch detected) so a figure is never quoted without its machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ISSUE_POLICY = {"mode": "adaptive", "threshold": -1, "layer_start": 5, "layer_end": 25, "warmup_tokens": 8, "skip_budget": 9, "dense_every": 0}
CALIBRATED_POLICY = {"mode": "adaptive", "threshold": 0.95, "layer_start": 5, "layer_end": 25, "warmup_tokens": 2, "skip_budget": 8, "dense_every": 0}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--policy-json", default=json.dumps(ISSUE_POLICY))
    ap.add_argument("--calibrated", action="store_true", help=f"also the calibrated policy {json.dumps(CALIBRATED_POLICY)}")
    ap.add_argument("--compiled", action="store_true", help="also each row with the compiled decode layer (FFNSKIP_COMPILE=1)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from ffnskip.bench import bench_speed
    from ffnskip.fastpath import matmul_backend
    from ffnskip.loading import load_model
    from ffnskip.policy import SkipPolicy

    if args.threads:
        torch.set_num_threads(args.threads)
    policies = {"issue": json.loads(args.policy_json)}
    if args.calibrated:
        policies["calibrated"] = CALIBRATED_POLICY
    rows = []
    for dtype in args.dtypes.split(","):
        model, tok = load_model(args.model, dtype=dtype, device=args.device)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            for name, pol in policies.items():
                layout = {"onednn": "onednn-packed", "avx512bf16": "avx512bf16-kernel", "avx2": "avx2-kernel", "aten": "F.linear"}.get(
                    matmul_backend(model.dtype, args.device), "panels")
                for compiled in (False, True) if args.compiled else (None,):
                    if compiled is not None:  # read by each decode session
                        os.environ["FFNSKIP_COMPILE"] = "1" if compiled else "0"
                    r = bench_speed(model, tok, SkipPolicy.from_dict(pol), batch_size=bs, new_tokens=args.new_tokens, repeats=args.repeats)
                    r.update(policy_name=name, policy=pol, layout=layout + (" + compiled" if compiled else ""))
                    rows.append(r)
                    print(f"  done {dtype} bs{bs} {name}{' compiled' if compiled else ''}", file=sys.stderr, flush=True)
                if args.compiled:
                    os.environ.pop("FFNSKIP_COMPILE", None)
        del model
    cpu = {"cpu": cpu_name(), "isa": str(torch.backends.cpu.get_cpu_capability()), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.json:
        print(json.dumps({"machine": cpu, "runs": rows}))
        return 0
    print(f"{args.model} on {cpu['cpu']} ({cpu['isa']}, {cpu['threads']} threads, torch {cpu['torch']}), {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print("| dtype | batch | policy | layout | (a) transformers | (b) ffnskip dense | (c) policy | b/a | skip ratio (all rows) | ideal | c/b | efficiency |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['batch_size']} | {r['policy_name']} | {r['layout']} | {r['hf_dense_tps']:.2f} | {r['dense_tps']:.2f} | "
              f"{r['skip_tps']:.2f} | {r['engine_vs_hf']:.2f} | {r['skip_ratio']:.3f} ({r['skip_ratio_all_rows']:.3f}) | "
              f"{r['ideal_speedup']:.3f} | {r['speedup']:.3f} | {r['efficiency']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
