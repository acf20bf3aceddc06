"""Native CPU kernels of the fast path, compiled on first use: two bf16 linears for the decode
step's small row counts on x86-64.

* ``avx512bf16`` (``csrc/bf16_linear_avx512.cpp``), for CPUs with AVX512_BF16 (AMD Zen 4, Intel
  Cooper Lake / Sapphire Rapids and later): a ``[N/16, ceil(K/2), 16, 2]`` packed copy of the
  weight (:func:`pack_avx512`), so that one 64-byte load feeds one ``VDPBF16PS`` (two products of
  16 columns added into fp32 sums). Measured on AMD EPYC Zen 4 (``benchmarks/bf16_kernel.py``):
  1.3-2x oneDNN's packed bf16 linear at 1-8 rows with the weights streaming from memory, slower
  than oneDNN from about 12 rows on, so the fast path uses it up to :data:`MAX_ROWS` rows. On an
  Intel Xeon with AMX-BF16 oneDNN multiplies on AMX tiles, flat in the row count: there the kernel
  is faster at 1-2 rows and slower from 3 (the LM head) or 5 (the layers) on, so it takes up to
  :data:`AMX_MAX_ROWS` rows, and the prompt pass leaves longer prompts to oneDNN
  (:func:`max_rows`).
* ``avx2`` (``csrc/bf16_linear_avx2.cpp``), for CPUs with AVX2 and FMA but no AVX512_BF16 or AMX
  (for example AMD EPYC Zen 3), where oneDNN has no native bf16 kernel and ``F.linear`` in bf16
  runs at or below fp32 speed: a ``[N/16, K, 16]`` packed copy (:func:`pack`), bf16 widened to
  fp32 with a shift, fp32 FMA sums.

Both add the bias in fp32 and round once to bf16: F.linear's rounding points, with another order
of the fp32 additions (so outputs agree with F.linear's to the last bf16 bit or one unit of it).

Each library is built with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``, in
requirements.txt) into ``$FFNSKIP_CACHE_DIR/kernels`` (default ``~/.cache/ffnskip/kernels``),
once per content of the sources, torch and Python environment (:func:`build_dir`), under
cpp_extension's file lock, so concurrent processes build it once, and checked on this CPU before
use. Servers and the CLI build it when they load a model (:func:`ffnskip.fastpath.prepare`), not
in the first request. If it cannot be built, the fast path
logs why and falls back (oneDNN where it has native bf16, else ``F.linear``).

Each library also carries the decode step's small ops (``csrc/decode_ops.h``, :class:`DecodeOps`),
which an fp32 fast path on x86-64 uses too (:func:`fp32_ops`; its matmuls stay fp32).

Which bf16 matmul the fast path uses is chosen by ``ffnskip.fastpath.matmul_backend``;
``FFNSKIP_BF16_KERNEL`` overrides the choice (``auto``, ``onednn``, ``avx512bf16``, ``avx2``,
``aten``), for tests and measurements.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "FFNSKIP_BF16_KERNEL"
BACKENDS = ("auto", "onednn", "avx512bf16", "avx2", "aten")
BLOCK = 16  # output columns per packed block (both kernels)
MAX_ROWS = 8  # the fast path runs ffnskip's kernels up to this many rows per call, oneDNN above (where it has bf16)
AMX_MAX_ROWS = 2  # the same on a CPU with AMX-BF16, where oneDNN's tiles are faster from 3 rows (benchmarks/bf16_kernel.py)
ROWS_ENV = "FFNSKIP_BF16_KERNEL_ROWS"  # overrides MAX_ROWS / AMX_MAX_ROWS, for measurements
_CSRC = Path(__file__).with_name("csrc")


@dataclass(frozen=True)
class Kernel:
    """One of ffnskip's kernels: where its source is, what it needs and how it is compiled."""

    name: str  # the FFNSKIP_BF16_KERNEL value that forces it
    what: str  # the instructions it needs, for messages
    source: Path
    op: str  # torch.ops.ffnskip.<op>
    needs: frozenset[str]  # /proc/cpuinfo flags
    cflags: tuple[str, ...]


KERNELS = {
    "avx512bf16": Kernel("avx512bf16", "AVX512_BF16", _CSRC / "bf16_linear_avx512.cpp", "bf16_linear_avx512",
                         frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}),
                         ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-ffp-contract=off")),
    "avx2": Kernel("avx2", "AVX2 + FMA", _CSRC / "bf16_linear_avx2.cpp", "bf16_linear_avx2",
                   frozenset({"avx2", "fma"}), ("-mavx2", "-mfma", "-ffp-contract=off")),
}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "flags"; per kernel name: True/False once tried, and "<name>_error": why it is not usable


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


def cpu_supports(name: str) -> bool:
    """Whether this CPU has the instructions of kernel ``name`` (x86-64 only)."""
    return platform.machine().lower() in ("x86_64", "amd64") and KERNELS[name].needs <= cpu_flags()


def has_avx2_fma() -> bool:
    return cpu_supports("avx2")


def has_avx512_bf16() -> bool:
    return cpu_supports("avx512bf16")


def cache_dir() -> Path:
    """``$FFNSKIP_CACHE_DIR/kernels`` or ``~/.cache/ffnskip/kernels``, one folder per torch and Python."""
    base = os.environ.get("FFNSKIP_CACHE_DIR")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "ffnskip"
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"
    return root / "kernels" / tag


def max_rows(name: str) -> int:
    """Up to how many rows per call the fast path runs ffnskip's kernel ``name`` where oneDNN has a
    native bf16 kernel for more (AVX512_BF16 or AMX): ``$FFNSKIP_BF16_KERNEL_ROWS`` if set, else
    :data:`AMX_MAX_ROWS` on a CPU with AMX-BF16 (oneDNN's tiles), else :data:`MAX_ROWS`. Where
    oneDNN has no bf16 kernel (AVX2 only) the kernel takes every row count."""
    value = os.environ.get(ROWS_ENV, "").strip()
    if value:
        try:
            rows = int(value)
        except ValueError:
            rows = -1
        if rows < 1:
            raise ValueError(f"{ROWS_ENV}={value!r}: use a whole number of rows >= 1")
        return rows
    return AMX_MAX_ROWS if name == "avx512bf16" and has_amx_bf16() else MAX_ROWS


def has_amx_bf16() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and "amx_bf16" in cpu_flags()


def requested() -> str:
    """``FFNSKIP_BF16_KERNEL`` (default ``auto``), checked."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV}={value!r}: use one of {', '.join(BACKENDS)}")
    return value


def error(name: str) -> str | None:
    """Why kernel ``name`` cannot run here (``None`` when it can); builds it on first call."""
    load(name)
    return _state.get(f"{name}_error")  # type: ignore[return-value]


def load(name: str) -> bool:
    """Build (once per source and torch version) and load kernel ``name``; whether it works.

    A failed build is logged once with its reason and not retried in this process."""
    kernel = KERNELS[name]
    with _lock:
        if name in _state:
            return bool(_state[name])
        ok, why = False, None
        if not cpu_supports(name):
            why = f"this CPU has no {kernel.what}"
        else:
            try:
                ok = _build(kernel)
            except Exception as exc:  # a missing compiler or ninja, a compile error: fall back, say why
                lines = str(exc).strip().splitlines()
                errors = [line.strip() for line in lines if "error:" in line]  # a compiler's first error says most
                why = f"{type(exc).__name__}: {errors[0] if errors else lines[-1] if lines else repr(exc)}"
                log.warning("ffnskip: the %s bf16 kernel could not be built (%s); bf16 matmuls fall back to oneDNN or "
                            "F.linear, slower on this CPU", kernel.what, why)
        _state[name], _state[f"{name}_error"] = ok, why
        return ok


def load_avx2_bf16() -> bool:
    return load("avx2")


def avx2_bf16_error() -> str | None:
    return error("avx2")


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


def build_dir(kernel: Kernel) -> Path:
    """Where ``kernel``'s library is built: a folder named after a hash of everything that goes
    into it (the sources of ``csrc/``, the flags, the compiler's torch headers and this Python),
    with its own copy of the sources. A second checkout of the same sources on this machine finds
    the library built; the sources' absolute path is in cpp_extension's ``build.ninja``, so
    building from each checkout's own copy made them rebuild each other's library (~25 s, seen
    inside a server's first request)."""
    from torch.utils import cpp_extension

    h = hashlib.sha256()
    for f in sorted(_CSRC.iterdir()):
        if f.suffix in (".cpp", ".h"):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(repr((kernel.cflags, cpp_extension.include_paths(), sys.executable)).encode())
    return cache_dir() / f"{kernel.source.stem}-{h.hexdigest()[:16]}"


def _sources(build: Path) -> Path:
    """Copy ``csrc/`` into ``build/src`` (once: the folder is named after its contents, and an
    unchanged file keeps its time, so ninja does not rebuild); the copied directory."""
    src = build / "src"
    src.mkdir(parents=True, exist_ok=True)
    for f in _CSRC.iterdir():
        if f.suffix in (".cpp", ".h") and not (src / f.name).exists():
            tmp = src / f".{f.name}.{os.getpid()}.tmp"
            shutil.copyfile(f, tmp)
            os.replace(tmp, src / f.name)  # whole or absent, if another process copies it too
    return src


def _build(kernel: Kernel) -> bool:
    from torch.utils import cpp_extension

    _ninja_on_path()
    build = build_dir(kernel)
    if not hasattr(torch.ops.ffnskip, kernel.op):
        started = time.monotonic()
        log.info("ffnskip: loading the %s bf16 kernel from %s (the first time this compiles it, under a minute)", kernel.what, build)
        source = _sources(build) / kernel.source.name
        cpp_extension.load(
            f"ffnskip_{kernel.source.stem}", [str(source)], build_directory=str(build), is_python_module=False,
            extra_cflags=["-O3", *kernel.cflags, "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        log.info("ffnskip: %s bf16 kernel ready in %.1f s", kernel.what, time.monotonic() - started)
    # A check on this CPU before any model uses it: the kernel's rounding against fp32 math.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 41, generator=g).bfloat16()
    w = torch.randn(32, 41, generator=g).bfloat16()
    b = torch.randn(32, generator=g).bfloat16()
    got = linear(x, pack_for(kernel.name, w), b).float()
    want = (x.float() @ w.float().t() + b.float())
    if not torch.allclose(got, want, rtol=2**-7, atol=1e-2):
        raise RuntimeError(f"the built kernel's self-check failed (max error {(got - want).abs().max().item():.3g})")
    return True


def pack(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] (N a multiple of 16) as the AVX2 kernel's ``[N/16, K, 16]``: each block
    of 16 output columns input-major, contiguous (one thread streams one contiguous run)."""
    n, k = w.shape
    if n % BLOCK:
        raise ValueError(f"pack: {n} output columns is not a multiple of {BLOCK}")
    return w.contiguous().view(n // BLOCK, BLOCK, k).transpose(1, 2).contiguous()  # [N/16, K, 16]


def pack_avx512(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] (N a multiple of 16) as the AVX512_BF16 kernel's ``[N/16, ceil(K/2), 16, 2]``:
    per block of 16 output columns, the pairs of consecutive inputs of each column side by side (an
    odd K gets a zero input)."""
    n, k = w.shape
    if n % BLOCK:
        raise ValueError(f"pack_avx512: {n} output columns is not a multiple of {BLOCK}")
    w = w.contiguous() if k % 2 == 0 else torch.nn.functional.pad(w, (0, 1))  # [N, 2P]
    return w.view(n // BLOCK, BLOCK, -1, 2).transpose(1, 2).contiguous()  # [N/16, P, 16, 2]


def pack_for(name: str, w: torch.Tensor) -> torch.Tensor:
    """``w`` [N, K] in kernel ``name``'s packed layout."""
    return pack_avx512(w) if name == "avx512bf16" else pack(w)


def op(name: str):
    """Kernel ``name``'s op: ``(x [M, K] bf16, packed, bias [N] or None) -> [M, N] bf16``."""
    return getattr(torch.ops.ffnskip, KERNELS[name].op)


class DecodeOps:
    """The decode step's small ops of kernel ``name``'s library (``csrc/decode_ops.h``), in bf16 and
    fp32: a fused RMSNorm, RoPE with the K/V cache writes, argmax and single-query attention, each
    one call instead of ATen's several (or slow) ones on CPU, with ATen's rounding points."""

    def __init__(self, name: str) -> None:
        ns = torch.ops.ffnskip
        self.name = name
        self._rms_norm = getattr(ns, f"rms_norm_{name}")
        self._argmax = getattr(ns, f"argmax_{name}")
        self._rope_cache = getattr(ns, f"rope_cache_{name}")
        self._attend = getattr(ns, f"attend_{name}")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' LlamaRMSNorm over the last dim of x [A, G, D]; weight [D] or [G, D]."""
        return self._rms_norm(x, weight, eps)

    def rope_cache(self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, col: int, n_heads: int) -> torch.Tensor:
        """transformers' RoPE on qk [B, H + Hkv, hd] (cos, sin [B, hd]); the rotated k heads and
        v [B, Hkv, hd] written into column ``col`` of the caches [B, Hkv, capacity, hd]; the rotated
        q [B, H, hd] returned. The same bits as the seven ATen ops it replaces."""
        return self._rope_cache(qk, v, cos, sin, k_cache, v_cache, col, n_heads)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, V] -> [B] int64, torch.argmax's answer (the first largest; a NaN wins)."""
        return self._argmax(x)

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n: int, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """One query per row: q [B, H, hd] against the first ``n`` columns of the caches
        [B, Hkv, capacity, hd] (GQA: H / Hkv query heads per K/V head), mask [B, n] bool (True: attend)
        or None -> [B, H, hd]; SDPA's softmax(q k^T scale) v in fp32, in its own order of additions."""
        return self._attend(q, k_cache, v_cache, n, mask, scale)


def decode_ops(name: str) -> DecodeOps | None:
    """Kernel ``name``'s decode ops once its library loaded (:func:`load`), else None."""
    if name not in KERNELS or not load(name):
        return None
    return DecodeOps(name)


def fp32_ops() -> str | None:
    """Which kernel library's decode ops an fp32 fast path on an x86-64 CPU uses (its matmuls stay
    fp32 panels): the AVX512_BF16 library where the CPU has it (the one bf16 would load too), else
    the AVX2 one; the one ``FFNSKIP_BF16_KERNEL`` names if it names one; none with ``aten`` or
    ``onednn`` (ATen's small ops, as in bf16) or when none builds (logged by :func:`load`).
    Measured on a 2-core Intel Xeon (AMX), SmolLM2-135M: ATen's fp32 RMSNorm is seven ops, ~50 us
    a call with their dispatches, 61 calls a step."""
    want = requested()
    if want in ("aten", "onednn"):
        return None
    for name in [want] if want in KERNELS else ["avx512bf16", "avx2"]:
        if cpu_supports(name) and load(name):
            return name
    return None


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for logits [B, V]: bf16 or fp32 on CPU through a loaded kernel
    library's argmax (ATen's bf16 argmax takes ~180 us per 49152 logits on Zen 4, this one a few),
    else torch's. Never builds anything: used only once a fast path loaded a library."""
    if logits.dtype in (torch.bfloat16, torch.float32) and logits.dim() == 2 and logits.device.type == "cpu" and logits.shape[1]:
        for name in KERNELS:
            if _state.get(name):
                return getattr(torch.ops.ffnskip, f"argmax_{name}")(logits)
    return logits.argmax(dim=-1)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 @ a packed weight (+ bias [N]) -> [M, N] bf16, on torch's intra-op threads; the
    kernel is the one whose layout ``packed`` has (4-D: AVX512_BF16, 3-D: AVX2)."""
    if packed.dim() == 4:
        return torch.ops.ffnskip.bf16_linear_avx512(x, packed, bias)
    return torch.ops.ffnskip.bf16_linear_avx2(x, packed, bias)
