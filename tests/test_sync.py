"""Every host-device synchronisation of a decode step is counted (``SeqStats.host_syncs``).

On CPU a synchronisation costs nothing, so the CPU test checks the contract itself: after the
prompt pass, no tensor is read back to the host except through :func:`ffnskip.sync.to_host`,
no Python list is sent to a device with ``torch.tensor(..., device=...)``, and each row's
``host_syncs`` equals the reads it took part in. On CUDA the same generations run under
``torch.cuda.set_sync_debug_mode("error")``, where any other synchronisation raises
(``benchmarks/gpu_check.sh`` runs it on a lent GPU; skipped without CUDA).

Both cover the fast decode path. The model's own forward (prompt pass, families the fast path
does not cover) runs transformers' code, which may synchronise on its own.
"""

from __future__ import annotations

import pytest
import torch
from tiny import TinyTokenizer, tiny_model

import ffnskip.decode as decode
import ffnskip.engine as engine
from ffnskip import SamplingParams, SkipPolicy, generate

TOK = TinyTokenizer()
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120], [200, 3, 64, 9, 11, 150, 31, 8, 77]]  # unequal: padded
POLICIES = {
    "eager": SkipPolicy(threshold=0.9, layer_start=1, layer_end=7, warmup_tokens=1, skip_budget=3, dense_every=0),
    "lagged": SkipPolicy(threshold=0.9, layer_start=1, layer_end=7, warmup_tokens=1, skip_budget=3, dense_every=0, lagged=True),
    "random": SkipPolicy(mode="random", layer_start=1, layer_end=7, warmup_tokens=1, skip_budget=3, dense_every=0, seed=2),
    "skipdecode": SkipPolicy(mode="skipdecode", layer_start=1, layer_end=7, warmup_tokens=1, skip_budget=3, dense_every=0),
}


class Watch:
    """Counts the sanctioned reads (``to_host``) and every other host read or list upload, the
    latter only once ``armed`` (after the prompt pass)."""

    def __init__(self, monkeypatch):
        self.armed = False
        self.inside = False
        self.reads = 0
        self.stray: list[str] = []
        orig_to_host = engine.to_host

        def to_host(t):
            if self.armed:
                self.reads += 1
            self.inside = True
            try:
                return orig_to_host(t)
            finally:
                self.inside = False

        monkeypatch.setattr(engine, "to_host", to_host)
        monkeypatch.setattr(decode, "to_host", to_host)
        for name in ("tolist", "item", "__bool__", "__int__", "__float__", "numpy", "cpu"):
            orig = getattr(torch.Tensor, name)

            def spy(t, *a, _name=name, _orig=orig, **k):
                if self.armed and not self.inside:
                    self.stray.append(f"Tensor.{_name}")
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)
        orig_tensor = torch.tensor

        def tensor(data, *a, **k):
            if self.armed and k.get("device") is not None:
                self.stray.append(f"torch.tensor(..., device={k['device']})")
            return orig_tensor(data, *a, **k)

        monkeypatch.setattr(torch, "tensor", tensor)
        orig_prefill = decode.prefill

        def prefill(*a, **k):
            self.armed = False
            out = orig_prefill(*a, **k)
            self.armed = True  # the decode loop starts here
            return out

        monkeypatch.setattr(decode, "prefill", prefill)


def _generate(model, policy, n=10):
    results = []
    for _ in generate(model, TOK, PROMPTS, policy, SamplingParams(max_new_tokens=n, ignore_eos=True), results=results, fast=True):
        pass
    return results


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_decode_step_reads_the_device_only_where_it_counts(name, monkeypatch):
    model = tiny_model("llama")
    watch = Watch(monkeypatch)
    results = _generate(model, POLICIES[name])
    assert watch.stray == []
    assert sum(r.stats.skipped_ffn for r in results) > 0
    if name != "skipdecode":  # (its schedule is by position: the same for every row)
        assert len({tuple(r.stats.skipped_per_layer) for r in results}) > 1  # rows split the batch
    for r in results:
        assert r.stats.host_syncs == watch.reads  # every row took part in every read
    if name == "eager":
        assert watch.reads > r.stats.generated_tokens  # + 1 per tested layer while a budget is held
    else:
        assert watch.reads == r.stats.generated_tokens  # exactly 1 per token


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it on a lent GPU)")
@pytest.mark.parametrize("name", list(POLICIES))
def test_cuda_decode_steps_run_under_sync_debug_error(name, monkeypatch):
    """After the prompt pass every synchronisation but the counted reads raises."""
    model = tiny_model("llama").cuda()
    orig_prefill = decode.prefill

    def prefill(*a, **k):
        torch.cuda.set_sync_debug_mode(0)
        out = orig_prefill(*a, **k)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        return out

    monkeypatch.setattr(decode, "prefill", prefill)
    reads = []
    orig_to_host = engine.to_host

    def to_host(t):
        reads.append(t.device.type)
        return orig_to_host(t)

    monkeypatch.setattr(engine, "to_host", to_host)
    monkeypatch.setattr(decode, "to_host", to_host)
    try:
        results = _generate(model, POLICIES[name])  # raises on any other synchronisation
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert set(reads) == {"cuda"}
    assert sum(r.stats.skipped_ffn for r in results) > 0
    for r in results:
        assert r.stats.host_syncs == len(reads)
        if name != "eager":
            assert r.stats.host_syncs == r.stats.generated_tokens  # exactly 1 per token
