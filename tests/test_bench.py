"""The speed benchmark's accounting (no timing assertions: speed is reported, not tested)."""

import statistics

import pytest
from tiny import tiny_model

from ffnskip import SkipPolicy, ffn_share
from ffnskip.bench import bench_speed, format_table, matmul_weight_bytes


class Tok:
    """Enough of a tokenizer for transformers.generate and our encode_prompt(raw=True)."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def __call__(self, text, return_tensors=None, padding=False):
        import torch

        rows = text if isinstance(text, list) else [text]
        ids = [[(ord(c) % 250) + 1 for c in r[:12]] for r in rows]
        if return_tensors is None:
            return {"input_ids": ids[0]}
        n = max(map(len, ids))
        input_ids = torch.tensor([[0] * (n - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in ids])

        class Enc(dict):
            def to(self, device):
                return Enc({k: v.to(device) for k, v in self.items()})

        return Enc(input_ids=input_ids, attention_mask=mask)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_bench_reports_every_field_consistently(batch_size):
    model = tiny_model("llama", layers=8)
    pol = SkipPolicy(threshold=-1, layer_start=2, layer_end=7, warmup_tokens=2, skip_budget=3, dense_every=0)
    r = bench_speed(model, Tok(), pol, batch_size=batch_size, new_tokens=10, repeats=2, read_buffer_mb=64)
    for key in ("hf_dense_tps", "dense_tps", "skip_tps", "skip_ratio", "ideal_speedup", "speedup", "efficiency",
                "engine_vs_hf", "syncs_per_token", "bandwidth_gbs", "machine_read_gbs"):
        assert r[key] > 0, key
    assert r["skip_ratio"] == pytest.approx(3 * 8 / (8 * 10))  # 3 FFNs on each of 8 post-warm-up tokens
    assert r["ideal_speedup"] == pytest.approx(1 / (1 - r["skip_ratio"] * ffn_share(model)))
    assert r["skip_ratio_all_rows"] == pytest.approx(r["skip_ratio"])  # threshold -1: every row skips the same FFNs
    assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    a, b, c = (r[k]["runs"] for k in ("hf_dense", "dense", "skip"))
    assert len(a) == len(b) == len(c) == 2
    assert r["engine_vs_hf"] == pytest.approx(statistics.median(y / x for x, y in zip(a, b)))  # paired runs
    assert r["speedup"] == pytest.approx(statistics.median(z / y for y, z in zip(b, c)))
    assert r["engine_vs_hf_of_medians"] == pytest.approx(r["dense_tps"] / r["hf_dense_tps"])
    assert r["hf_dense"]["min"] <= r["hf_dense_tps"] <= r["hf_dense"]["max"]
    assert "efficiency" in format_table(r)


def test_weight_bytes_count_a_tied_head_once():
    model = tiny_model("gemma3_text")  # ties the LM head to the input embedding
    per_layer = sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)
    assert matmul_weight_bytes(model) == 4 * (per_layer + model.lm_head.weight.numel())


def test_the_ideal_at_batch_above_one_counts_only_the_ffns_every_row_skipped():
    """Rows that skip different layers save no weight read where another row runs the FFN."""
    model = tiny_model("llama", layers=8)
    pol = SkipPolicy(threshold=0.9, layer_start=1, layer_end=7, warmup_tokens=1, skip_budget=3, dense_every=0)
    r = bench_speed(model, Tok(), pol, batch_size=3, new_tokens=10, repeats=1, read_buffer_mb=16)
    share = ffn_share(model)
    assert 0 <= r["skip_ratio_all_rows"] < r["skip_ratio"]  # the rows split: fewer FFNs skipped by all
    assert r["ideal_speedup"] == pytest.approx(1 / (1 - r["skip_ratio_all_rows"] * share))
    assert r["ideal_speedup_per_row"] == pytest.approx(1 / (1 - r["skip_ratio"] * share))
    assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
