"""Native CPU kernels of the fast path, compiled on first use.

One kernel so far: a bf16 linear for the decode step's small row counts on x86-64 CPUs with AVX2
and FMA but neither AVX512_BF16 nor AMX (for example AMD EPYC Zen 3). There oneDNN has no native
bf16 kernel and ``F.linear`` in bf16 runs at or below fp32 speed, so bf16 lost the point of
halving the bytes a decode step reads. The kernel (``csrc/bf16_linear_avx2.cpp``) reads a packed
copy of the weight (:func:`pack`), widens bf16 to fp32 with a shift, sums in fp32 with FMA, adds
the bias in fp32 and rounds once to bf16: F.linear's rounding points, with another order of the
fp32 additions (so outputs agree with F.linear's to the last bf16 bit or one unit of it).

The library is built with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``, in
requirements.txt) into ``$FFNSKIP_CACHE_DIR/kernels`` (default ``~/.cache/ffnskip/kernels``),
once per source, torch and Python version, under cpp_extension's file lock, so concurrent
processes build it once. If it cannot be built, the fast path logs why and uses ``F.linear``.

Which bf16 matmul the fast path uses is chosen by :func:`bf16_backend`; ``FFNSKIP_BF16_KERNEL``
overrides the choice (``auto``, ``onednn``, ``avx2``, ``aten``), for tests and measurements.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "FFNSKIP_BF16_KERNEL"
BACKENDS = ("auto", "onednn", "avx2", "aten")
BLOCK = 16  # output columns per packed block of the AVX2 kernel
SOURCE = Path(__file__).with_name("csrc") / "bf16_linear_avx2.cpp"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "avx2": True/False once tried, "avx2_error": why it is not usable


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    if "flags" not in _state:
        flags: frozenset[str] = frozenset()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags = frozenset(value.split())
                    break
        except OSError:
            pass
        _state["flags"] = flags
    return _state["flags"]  # type: ignore[return-value]


def has_avx2_fma() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu_flags()


def cache_dir() -> Path:
    """``$FFNSKIP_CACHE_DIR/kernels`` or ``~/.cache/ffnskip/kernels``, one folder per torch and Python."""
    base = os.environ.get("FFNSKIP_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "ffnskip"
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"
    return root / "kernels" / tag


def requested() -> str:
    """``FFNSKIP_BF16_KERNEL`` (default ``auto``), checked."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(BACKENDS)}")
    return value


def avx2_bf16_error() -> str | None:
    """Why the AVX2 bf16 kernel cannot run here (``None`` when it can); builds it on first call."""
    load_avx2_bf16()
    return _state.get("avx2_error")  # type: ignore[return-value]


def load_avx2_bf16() -> bool:
    """Build (once per source and torch version) and load the AVX2 bf16 kernel; whether it works.

    A failed build is logged once with its reason and not retried in this process."""
    with _lock:
        if "avx2" in _state:
            return bool(_state["avx2"])
        ok, error = False, None
        if not has_avx2_fma():
            error = "this CPU has no AVX2 + FMA"
        else:
            try:
                ok = _build()
            except Exception as exc:  # a missing compiler or ninja, a compile error: fall back, say why
                text = str(exc).strip()
                error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else repr(exc)}"  # a compiler's last line says most
                log.warning("ffnskip: the AVX2 bf16 kernel could not be built (%s); bf16 matmuls use F.linear, "
                            "which is several times slower on this CPU", error)
        _state["avx2"], _state["avx2_error"] = ok, error
        return ok


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; a venv's (the ``ninja`` wheel's) is not on it unless
    the venv is activated."""
    if shutil.which("ninja"):
        return
    dirs = [str(Path(sys.executable).parent)]
    try:
        import ninja

        dirs.insert(0, str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join([*dirs, os.environ.get("PATH", "")])
    if not shutil.which("ninja"):
        raise RuntimeError("ninja is not installed (pip install ninja)")


def _build() -> bool:
    from torch.utils import cpp_extension

    _ninja_on_path()
    build = cache_dir() / "bf16_linear_avx2"
    build.mkdir(parents=True, exist_ok=True)
    if not hasattr(torch.ops.ffnskip, "bf16_linear_avx2"):
        started = time.monotonic()
        log.info("ffnskip: loading the AVX2 bf16 kernel from %s (the first time this compiles it, about a minute)", build)
        cpp_extension.load(
            "ffnskip_bf16_linear_avx2", [str(SOURCE)], build_directory=str(build), is_python_module=False,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        log.info("ffnskip: AVX2 bf16 kernel ready in %.1f s", time.monotonic() - started)
    # A check on this CPU before any model uses it: the kernel's rounding against fp32 math.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g).bfloat16()
    w = torch.randn(32, 40, generator=g).bfloat16()
    b = torch.randn(32, generator=g).bfloat16()
    got = linear(x, pack(w), b).float()
    want = (x.float() @ w.float().t() + b.float())
    if not torch.allclose(got, want, rtol=2**-7, atol=1e-2):
        raise RuntimeError(f"the built kernel's self-check failed (max error {(got - want).abs().max().item():.3g})")
    return True


def pack(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] (N a multiple of 16) as the kernel's ``[N/16, K, 16]``: each block of 16
    output columns input-major, contiguous (one thread streams one contiguous run)."""
    n, k = w.shape
    if n % BLOCK:
        raise ValueError(f"pack: {n} output columns is not a multiple of {BLOCK}")
    return w.contiguous().view(n // BLOCK, BLOCK, k).transpose(1, 2).contiguous()  # [N/16, K, 16]


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ packed [N/16, K, 16] (+ bias [N]) -> [M, N] bf16, on torch's intra-op threads."""
    return torch.ops.ffnskip.bf16_linear_avx2(x, packed, bias)
