"""ffnskip's bf16 linears (ffnskip.kernels: AVX512_BF16 and AVX2 + FMA) for small row counts,
measured beside oneDNN's packed bf16 linear (where the CPU has native bf16), F.linear in bf16 and
F.linear in fp32, on SmolLM2-135M's matmul shapes.

By default every kernel cycles through copies of the weight that together exceed ``--stream-mb``
(256 MB, about the bf16 weights of a SmolLM2-135M decode step), so each call reads its weight from
memory as in a decode step; ``--stream-mb 0`` times one weight over and over (cache-resident).

    python benchmarks/bf16_kernel.py            # builds the kernels once if needed, then times them
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from ffnskip import kernels
from ffnskip.fastpath import onednn_low_precision

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: qkv, o, gate_up, down, head


def timeit(f, copies: int, n: int) -> float:
    """Microseconds per call of ``f(i)``, i cycling over ``copies`` weights."""
    for i in range(min(copies, 3)):
        f(i)
    calls = max(n, copies)
    t = time.perf_counter()
    for i in range(calls):
        f(i % copies)
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--stream-mb", type=int, default=256, help="memory the weight copies span (0: one cache-resident weight)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ours = [name for name in kernels.KERNELS if kernels.cpu_supports(name) and kernels.load(name)]
    if not ours:
        raise SystemExit("bf16_kernel: none of ffnskip's bf16 kernels can run here: "
                         + "; ".join(f"{name}: {kernels.error(name)}" for name in kernels.KERNELS))
    onednn = onednn_low_precision(torch.bfloat16)
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, weights {'from memory' if args.stream_mb else 'cache-resident'}")
    cols = [*(f"{name} us (GB/s)" for name in ours), *(["oneDNN packed bf16 us (GB/s)"] if onednn else []),
            "F.linear bf16 us", "F.linear fp32 us", "outputs != F.linear bf16"]
    print("| N x K | rows | " + " | ".join(cols) + " |")
    print("|" + " --- |" * (len(cols) + 2))
    for n, k in SHAPES:
        copies = max(1, args.stream_mb * 2**20 // (n * k * 2)) if args.stream_mb else 1
        ws = [torch.randn(n, k).bfloat16() for _ in range(copies)]
        bias = torch.randn(n).bfloat16()
        packs = {name: [kernels.pack_for(name, w) for w in ws] for name in ours}
        dnn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in ws] if onednn else []
        w32 = [w.float() for w in ws[: max(1, copies // 2)]]  # fp32 copies span the same memory
        for m in args.rows:
            x = torch.randn(m, k).bfloat16()
            x32 = x.float()
            cells = []
            for name in ours:
                run, ps = kernels.op(name), packs[name]
                us = timeit(lambda i: run(x, ps[i], bias), copies, args.iters)
                cells.append(f"{us:.0f} ({n * k * 2 / us / 1e3:.1f})")
            if onednn:
                us = timeit(lambda i: torch.ops.mkldnn._linear_pointwise(x, dnn[i], bias, "none", [], ""), copies, args.iters)
                cells.append(f"{us:.0f} ({n * k * 2 / us / 1e3:.1f})")
            cells.append(f"{timeit(lambda i: F.linear(x, ws[i], bias), copies, max(5, args.iters // 5)):.0f}")
            cells.append(f"{timeit(lambda i: F.linear(x32, w32[i], bias.float()), len(w32), max(5, args.iters // 5)):.0f}")
            ref = F.linear(x, ws[0], bias)
            differ = max((kernels.op(name)(x, packs[name][0], bias) != ref).float().mean().item() for name in ours)
            cells.append(f"{differ:.2%}")
            print(f"| {n} x {k} | {m} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
