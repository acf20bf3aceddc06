"""The fast path's AVX2 + FMA bf16 linear (ffnskip.kernels) for small row counts, measured beside
F.linear in bf16 and in fp32 on SmolLM2-135M's matmul shapes.

On x86-64 CPUs without AVX512_BF16/AMX, oneDNN has no native bf16 kernel and F.linear in bf16 runs
at or below fp32 speed; this kernel (ffnskip/csrc/bf16_linear_avx2.cpp) widens bf16 weights with
a shift and sums in fp32 with FMA over a [N/16, K, 16] packed copy, on torch's own threads.

    python benchmarks/bf16_kernel.py            # builds the kernel once if needed, then times it
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F

from ffnskip import kernels

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: qkv, o, gate_up, down, head


def timeit(f, n: int) -> float:
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not kernels.load_avx2_bf16():
        raise SystemExit(f"bf16_kernel: the AVX2 bf16 kernel cannot run here: {kernels.avx2_bf16_error()}")
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| N x K | rows | kernel us (GB/s) | F.linear bf16 us | F.linear fp32 us | outputs != F.linear bf16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, k in SHAPES:
        w = torch.randn(n, k).bfloat16()
        wp, w32, bias = kernels.pack(w), w.float(), torch.randn(n).bfloat16()
        for m in args.rows:
            x = torch.randn(m, k).bfloat16()
            differ = (kernels.linear(x, wp, bias) != F.linear(x, w, bias)).float().mean().item()
            a = timeit(lambda: kernels.linear(x, wp, bias), args.iters)
            b = timeit(lambda: F.linear(x, w, bias), max(5, args.iters // 5))
            c = timeit(lambda: F.linear(x.float(), w32, bias.float()), max(5, args.iters // 5))
            print(f"| {n} x {k} | {m} | {a:.0f} ({n * k * 2 / a / 1e3:.1f}) | {b:.0f} | {c:.0f} | {differ:.2%} |")


if __name__ == "__main__":
    main()
