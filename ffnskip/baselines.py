"""Building the paper's baselines at a given skip budget (method.md §4).

* ``random`` and ``static`` need nothing beyond a :class:`SkipPolicy` with that mode; to compare
  them with an adaptive policy *at the same skip ratio*, :func:`matched_budget` picks the
  per-token budget ``k`` whose expected skip ratio is closest to a target, given the lengths of
  the outputs.
* ``shortgpt`` removes whole layers: those with the lowest block influence
  ``1 - cos(layer input, layer output)``, measured densely on real text by
  :func:`ffnskip.saturation.layer_cosines`. :func:`shortgpt_policy` measures it and returns the
  policy with the removed layers.
* ``skipdecode`` (position-based exit schedule) is a policy mode of the engine.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from .adapters import get_adapter
from .policy import PolicyError, SkipPolicy

log = logging.getLogger(__name__)

__all__ = [
    "block_influence",
    "estimate_adaptive_ratio",
    "expected_skip_ratio",
    "matched_budget",
    "measured",
    "shortgpt_layers",
    "shortgpt_policy",
]


def block_influence(model, tokenizer, text: str | None = None, tokens: int = 512, data_dir=None) -> list[float]:
    """ShortGPT block influence per layer, ``1 - mean_t cos(layer input_t, layer output_t)``,
    over the first ``tokens`` tokens of ``text`` (default: the WikiText-2 raw test split)."""
    from .data import wikitext2_text
    from .saturation import layer_cosines

    if text is None:
        text = wikitext2_text(data_dir)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]  # [1, N]
    if ids.shape[1] < 2:
        raise ValueError("the text for the block-influence profile is too short (fewer than 2 tokens)")
    _, block_cos = layer_cosines(model, ids)  # [L, N]
    return (1 - block_cos.mean(dim=1)).tolist()


def shortgpt_layers(influence: Sequence[float], n: int) -> list[int]:
    """The ``n`` layers of lowest block influence, in layer order (ties: the later layer first)."""
    if not 0 <= n <= len(influence):
        raise PolicyError("skip_budget", f"ShortGPT cannot remove {n} of {len(influence)} layers")
    order = sorted(range(len(influence)), key=lambda i: (influence[i], -i))
    return sorted(order[:n])


def _layers_for_budget(budget: int | float | None, num_layers: int, base: SkipPolicy) -> int:
    if budget is None:
        return base.resolve(num_layers).budget
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise PolicyError("skip_budget", f"must be a number of layers or a share in (0, 1); got {budget!r}")
    if isinstance(budget, float) and 0 < budget < 1:
        return max(1, round(budget * num_layers))
    if isinstance(budget, float) and not budget.is_integer():
        raise PolicyError("skip_budget", f"a share must be in (0, 1); got {budget}")
    n = int(budget)
    if not 0 <= n < num_layers:
        raise PolicyError("skip_budget", f"must be between 0 and {num_layers - 1} layers; got {n}")
    return n


def shortgpt_policy(
    model,
    tokenizer,
    budget: int | float | None,
    text: str | None = None,
    *,
    tokens: int = 512,
    base: SkipPolicy | None = None,
    data_dir=None,
    influence: Sequence[float] | None = None,
) -> SkipPolicy:
    """A ``shortgpt`` policy removing the ``budget`` layers of lowest block influence.

    ``budget``: a number of layers, a share of the layers in (0, 1), or ``None`` for the
    resolved ``skip_budget`` of ``base``. ``base`` supplies the other fields (default: no
    warm-up and no dense tokens, as ShortGPT removes layers for good). ``influence`` skips
    the measurement (e.g. from a saved profile's ``block_influence`` column).
    """
    if "layers" not in {f.name for f in dataclasses.fields(SkipPolicy)}:
        raise NotImplementedError("this engine's SkipPolicy has no 'layers' field: the shortgpt mode is not available yet")
    num_layers = len(get_adapter(model).layers(model))
    fields = base.to_dict() if base is not None else {"warmup_tokens": 0, "dense_every": 0}
    fields.update(mode="adaptive", layers=None)
    n = _layers_for_budget(budget, num_layers, SkipPolicy.from_dict(fields))
    if n < 1:
        raise PolicyError("skip_budget", "ShortGPT must remove at least one layer")
    if influence is None:
        influence = block_influence(model, tokenizer, text, tokens=tokens, data_dir=data_dir)
    if len(influence) != num_layers:
        raise ValueError(f"block influence has {len(influence)} values for a {num_layers}-layer model")
    layers = shortgpt_layers(influence, n)
    log.info("shortgpt: removing layers %s (block influence %s)", layers, [round(influence[i], 4) for i in layers])
    fields.update(mode="shortgpt", layers=layers)
    return SkipPolicy.from_dict(fields)


def measured(model, tokenizer, policy: SkipPolicy, data_dir=None) -> SkipPolicy:
    """``policy`` ready to run on ``model``: an unmeasured ``shortgpt`` policy
    (:meth:`SkipPolicy.shortgpt`, ``{"mode": "shortgpt"}`` without ``layers``) gets the
    ``skip_budget`` (default: 30% of the layers) lowest-influence layers measured here; every
    other policy is returned as is."""
    if not policy.unmeasured:
        return policy
    base = SkipPolicy.from_dict({**policy.to_dict(), "mode": "adaptive", "layers": None})
    return shortgpt_policy(model, tokenizer, None, base=base, data_dir=data_dir)


# ---------------------------------------------------------------------- budget matching
def expected_skip_ratio(policy: SkipPolicy, num_layers: int, lengths: Sequence[int]) -> float:
    """The skip ratio a ``random`` / ``static`` policy reaches over outputs of these lengths
    (generated tokens each): ``budget`` FFNs on every token whose schedule allows skipping."""
    res = policy.resolve(num_layers)
    skipping = sum(1 for n in lengths for t in range(n) if res.token_budget(t) > 0)
    total = num_layers * sum(lengths)
    return res.budget * skipping / total if total else 0.0


def matched_budget(policy: SkipPolicy, num_layers: int, lengths: Sequence[int], target_ratio: float) -> int:
    """The ``skip_budget`` for ``policy`` (same warm-up and ``dense_every``) whose expected skip
    ratio over outputs of ``lengths`` tokens is closest to ``target_ratio`` (ties: smaller)."""
    res = policy.resolve(num_layers)
    width = res.end - res.start
    best, best_err = 0, float("inf")
    for k in range(0, width + 1):
        p = dataclasses.replace(policy, skip_budget=k)
        err = abs(expected_skip_ratio(p, num_layers, lengths) - target_ratio)
        if err < best_err - 1e-12:
            best, best_err = k, err
    return best


def estimate_adaptive_ratio(
    ffn_cos: Sequence[Sequence[Sequence[float]]],
    lengths: Sequence[int],
    policy: SkipPolicy,
) -> tuple[float, float]:
    """Skip ratio the ``adaptive`` rule would reach, estimated from dense cosines.

    ``ffn_cos[i]`` is ``[L][n_i]``: for sample ``i``, cos(residual before FFN, after it) per
    layer at the input position of the pass that produced each of its ``n_i = lengths[i]``
    generated tokens (from :func:`ffnskip.saturation.layer_cosines` over prompt + dense output,
    positions ``S-1 .. S+n-2``). The rule of method.md §2 is replayed on them; skipping changes
    later hidden states, so this is an estimate for calibration (measure the real ratio).
    Returns ``(skip_ratio, trigger_rate)`` (share of skip-eligible tokens whose test fired).
    """
    L = len(ffn_cos[0]) if ffn_cos else 0
    res = policy.resolve(L)
    tau = policy.threshold
    skipped = tokens = eligible = fired = 0
    for cos, n in zip(ffn_cos, lengths):
        tokens += n
        for t in range(n):
            k = res.token_budget(t)
            if k == 0:
                continue
            eligible += 1
            for layer in res.test_layers:
                if cos[layer][t] > tau:
                    skipped += len(res.run_after(layer, k))
                    fired += 1
                    break
    return (skipped / (L * tokens) if tokens else 0.0, fired / eligible if eligible else 0.0)
