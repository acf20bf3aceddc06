"""Prototype (not wired into the engine yet): an AVX2 + FMA bf16 linear for small row counts,
measured beside F.linear in bf16 and in fp32 on this model's matmul shapes.

On x86-64 CPUs without AVX512_BF16/AMX, oneDNN has no native bf16 kernel and F.linear in bf16 runs
at or below fp32 speed; this kernel (benchmarks/kernels/bf16_gemm_avx2.cpp) widens bf16 weights
with a shift and sums in fp32 with FMA over a [N/16, K, 16] packed copy, on torch's own threads.

    python benchmarks/bf16_kernel.py            # builds the extension once (~70 s), then times it
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # SmolLM2-135M: qkv, o, gate_up, down, head


def build():
    from torch.utils.cpp_extension import load

    src = Path(__file__).with_name("kernels") / "bf16_gemm_avx2.cpp"
    return load("ffnskip_bf16_avx2", [str(src)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])


def pack(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N/16, K, 16]: each block of 16 output columns, input-major, contiguous."""
    n, k = w.shape
    return w.view(n // 16, 16, k).transpose(1, 2).contiguous()


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
    flags = Path("/proc/cpuinfo").read_text()
    if " avx2 " not in flags or " fma " not in flags:
        raise SystemExit("bf16_kernel: this CPU has no AVX2 + FMA")
    ext = build()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| N x K | rows | kernel us (GB/s) | F.linear bf16 us | F.linear fp32 us | outputs != F.linear bf16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, k in SHAPES:
        w = torch.randn(n, k).bfloat16()
        wp, w32, bias = pack(w), w.float(), torch.randn(n).bfloat16()
        for m in args.rows:
            x = torch.randn(m, k).bfloat16()
            differ = (ext.linear(x, wp, bias) != F.linear(x, w, bias)).float().mean().item()
            a = timeit(lambda: ext.linear(x, wp, bias), args.iters)
            b = timeit(lambda: F.linear(x, w, bias), max(5, args.iters // 5))
            c = timeit(lambda: F.linear(x.float(), w32, bias.float()), max(5, args.iters // 5))
            print(f"| {n} x {k} | {m} | {a:.0f} ({n * k * 2 / a / 1e3:.1f}) | {b:.0f} | {c:.0f} | {differ:.2%} |")


if __name__ == "__main__":
    main()
