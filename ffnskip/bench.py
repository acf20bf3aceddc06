"""Speed benchmark: transformers ``generate`` vs our engine dense vs our engine with a policy.

All three run in one process, alternating, after a warm-up, on the same prompts; each reports the
median tokens/s of ``repeats`` runs with min and max. Beside them: the realised skip ratio, the
ideal speedup from the model's shapes ``1 / (1 - s * ffn_share)`` (method.md §3), the efficiency
(achieved / ideal), the weight bandwidth achieved and the machine's read bandwidth measured in the
same run (the bound a batch-1 decoder cannot beat: every weight is read once per token).

At batch > 1 the ideal counts only the FFNs that *every* row of the batch skipped in a step
(``s_all``): a weight read is saved only when no row runs the layer; an FFN that some rows skip and
others run still streams its weights once. ``ideal_speedup_per_row`` (from the per-row skip ratio,
the batch-1 formula) is reported beside it.

``speedup`` (c/b) and ``engine_vs_hf`` (b/a) are medians of per-repeat ratios of runs made back to
back, which a machine whose speed drifts between repeats disturbs least; the ratios of the medians
are reported beside them (``*_of_medians``).
"""

from __future__ import annotations

import logging
import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .decode import SamplingParams, encode_prompt, generate
from .engine import SeqStats, SkipController, ffn_share
from .policy import SkipPolicy

log = logging.getLogger(__name__)

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List some practical tips for learning a new language as an adult.",
    "Describe the water cycle in a few paragraphs.",
    "What are the main differences between classical and quantum computers?",
    "Give me a recipe for a simple vegetable soup.",
    "Summarise the history of the printing press.",
    "Why do cats purr? Give a few hypotheses.",
]


@dataclass
class Timing:
    tps: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.tps)

    def to_dict(self) -> dict:
        return {"median": self.median, "min": min(self.tps), "max": max(self.tps), "runs": list(self.tps)}


def matmul_weight_bytes(model: nn.Module) -> int:
    """Bytes of the matrices a decode step reads (every 2-D weight but the input embedding,
    which is gathered, not streamed; a tied LM head is counted once)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total, seen = 0, set()
    for p in model.parameters():
        if p.dim() != 2 or id(p) in seen:
            continue
        seen.add(id(p))
        if p is emb and (head is None or head.weight is not emb):
            continue
        total += p.numel() * p.element_size()
    return total


def machine_read_gbs(device: torch.device, size_mb: int = 1024, repeats: int = 5) -> float:
    """Read bandwidth: best of ``repeats`` full reductions over a buffer larger than any cache."""
    n = size_mb * 1024 * 1024 // 4
    buf = torch.ones(n, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        buf.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    del buf
    return n * 4 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_generate(model, tok, prompts: list[str], new_tokens: int) -> float:
    enc = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    device = model.device
    _sync(device)
    t0 = time.perf_counter()
    model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    return len(prompts) * new_tokens / (time.perf_counter() - t0)


@dataclass
class JointSkips:
    """Batch-level skip accounting: layer-steps that every producing row of the batch skipped."""

    layer_steps: int = 0
    all_skipped: int = 0

    @property
    def ratio(self) -> float:
        return self.all_skipped / self.layer_steps if self.layer_steps else 0.0


@contextmanager
def count_joint_skips(acc: JointSkips):
    """While active, every :meth:`SkipController.end_step` also counts, per layer, whether all rows
    that produced a token skipped its FFN (the benchmark's instrumentation; host-side only)."""
    orig = SkipController.end_step

    def end_step(self, produced, syncs=0):
        rows = [r for r in range(self.batch_size) if produced[r]]
        if rows:
            acc.layer_steps += self.num_layers
            acc.all_skipped += sum(all(self._skip[r][i] for r in rows) for i in range(self.num_layers))
        return orig(self, produced, syncs)

    SkipController.end_step = end_step
    try:
        yield acc
    finally:
        SkipController.end_step = orig


def _ours(model, tok, ids, policy: SkipPolicy, new_tokens: int, fast: bool | None, joint: JointSkips | None = None) -> tuple[float, SeqStats]:
    results = []
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    device = next(model.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    with count_joint_skips(joint) if joint is not None else _nothing():
        for _ in generate(model, tok, ids, policy, params, results=results, fast=fast):
            pass
    _sync(device)
    dt = time.perf_counter() - t0
    return sum(r.stats.generated_tokens for r in results) / dt, SeqStats.merge([r.stats for r in results])


@contextmanager
def _nothing():
    yield


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_speed(
    model: nn.Module,
    tok,
    policy: SkipPolicy,
    *,
    batch_size: int = 1,
    new_tokens: int = 64,
    repeats: int = 4,
    fast: bool | None = None,
    progress=None,
    read_buffer_mb: int = 1024,
) -> dict:
    if batch_size <= 0 or new_tokens <= 0 or repeats <= 0:
        raise ValueError("--batch-size, --new-tokens and --repeats must be positive")
    device = next(model.parameters()).device
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    ids = [encode_prompt(tok, p, raw=True) for p in prompts]
    dense = SkipPolicy.dense()
    # warm-up: one short run of transformers; ours at full length, so that every code path the
    # timed runs take (the policy's skips start after its warm-up tokens; the compiled layer's
    # graphs, FFNSKIP_COMPILE=1) has run once before the clock starts
    _hf_generate(model, tok, prompts, 4)
    _ours(model, tok, ids, dense, new_tokens, fast)
    _ours(model, tok, ids, policy, new_tokens, fast)
    hf, ours_dense, ours_skip = [], [], []
    skip_stats = dense_stats = None
    joint = JointSkips()
    for i in range(repeats):
        # Odd repeats run in reverse order (a b c, c b a, ...): (b) and (c) always run back to
        # back, and a machine that drifts slower or faster over the run favours none of them.
        order = ("a", "b", "c") if i % 2 == 0 else ("c", "b", "a")
        for which in order:
            if which == "a":
                hf.append(_hf_generate(model, tok, prompts, new_tokens))
            elif which == "b":
                tps, dense_stats = _ours(model, tok, ids, dense, new_tokens, fast)
                ours_dense.append(tps)
            else:
                joint = JointSkips()  # the last run's (every run decodes the same tokens)
                tps, skip_stats = _ours(model, tok, ids, policy, new_tokens, fast, joint)
                ours_skip.append(tps)
        if progress:
            progress(i + 1, repeats)
    a, b, c = Timing(hf), Timing(ours_dense), Timing(ours_skip)
    s = skip_stats.skip_ratio
    share = ffn_share(model)
    s_all = joint.ratio  # = s at batch 1
    ideal = 1.0 / (1.0 - s_all * share)  # weight reads saved: FFNs that every row skipped
    # Ratios from paired runs (adjacent in time), then the median: on a shared machine whose
    # speed drifts between repeats this is steadier than a ratio of medians; both are reported.
    speedup = statistics.median(ci / bi for bi, ci in zip(ours_dense, ours_skip))
    engine_vs_hf = statistics.median(bi / ai for ai, bi in zip(hf, ours_dense))
    wbytes = matmul_weight_bytes(model)
    # Batch-1 decode streams the weights once per step; a step makes `batch_size` tokens.
    steps_per_s = b.median / batch_size
    return {
        "model_ffn_share": share,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "hf_dense": a.to_dict(),
        "dense": b.to_dict(),
        "skip": c.to_dict(),
        "hf_dense_tps": a.median,
        "dense_tps": b.median,
        "skip_tps": c.median,
        "skip_ratio": s,
        "skip_ratio_post_warmup": skip_stats.skip_ratio_post_warmup,
        "skip_ratio_all_rows": s_all,
        "ideal_speedup": ideal,
        "ideal_speedup_per_row": 1.0 / (1.0 - s * share),
        "speedup": speedup,
        "efficiency": speedup / ideal,
        "engine_vs_hf": engine_vs_hf,
        "speedup_of_medians": c.median / b.median,
        "engine_vs_hf_of_medians": b.median / a.median,
        "syncs_per_token": skip_stats.syncs_per_token,
        "dense_syncs_per_token": dense_stats.syncs_per_token,
        "weight_bytes": wbytes,
        "bandwidth_gbs": wbytes * steps_per_s / 1e9,
        "machine_read_gbs": machine_read_gbs(device, read_buffer_mb),
        "peak_memory_mb": peak_memory_mb(device),
    }


def format_table(r: dict) -> str:
    lines = [
        f"model ffn share {r['model_ffn_share']:.3f} | batch {r['batch_size']} | {r['new_tokens']} new tokens | "
        f"{r['repeats']} repeats | {r['device']} {r['dtype']} | {r['threads']} threads",
        f"{'':28}{'median tok/s':>13}{'min':>9}{'max':>9}",
    ]
    for name, key in (("(a) transformers generate", "hf_dense"), ("(b) ffnskip dense", "dense"), ("(c) ffnskip policy", "skip")):
        t = r[key]
        lines.append(f"{name:28}{t['median']:>13.2f}{t['min']:>9.2f}{t['max']:>9.2f}")
    lines += [
        f"skip ratio {r['skip_ratio']:.3f} (post warm-up {r['skip_ratio_post_warmup']:.3f}, "
        f"all rows {r['skip_ratio_all_rows']:.3f}) | "
        f"ideal speedup {r['ideal_speedup']:.3f}x | speedup c/b {r['speedup']:.3f}x | efficiency {r['efficiency']:.3f}",
        f"engine vs transformers b/a {r['engine_vs_hf']:.2f}x | host syncs/token {r['syncs_per_token']:.2f} "
        f"(dense {r['dense_syncs_per_token']:.2f}) | peak memory {r['peak_memory_mb']:.0f} MB",
        f"weights {r['weight_bytes'] / 1e9:.3f} GB/step -> {r['bandwidth_gbs']:.1f} GB/s achieved (dense) of "
        f"{r['machine_read_gbs']:.1f} GB/s machine read bandwidth "
        f"({r['bandwidth_gbs'] / r['machine_read_gbs']:.0%} of the bound)",
    ]
    return "\n".join(lines)
