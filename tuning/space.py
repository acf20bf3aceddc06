"""The search space over SkipPolicy fields: default bounds from the model's depth, sampling.

Plain Python (no Ray): :func:`resolve_space` turns a config's :class:`~tuning.config.SearchSpace`
into concrete bounds for an ``L``-layer model; :func:`suggest` is the define-by-run function
handed to Optuna (through Ray Tune's ``OptunaSearch``); :func:`policy_from_params` builds the
trial's :class:`ffnskip.SkipPolicy`.
"""

from __future__ import annotations

from typing import Any

from ffnskip.policy import SkipPolicy

from .config import SPACE_KEYS, ConfigError, SearchSpace

FLOAT_KEYS = ("threshold",)


def default_bounds(num_layers: int, max_new_tokens: int | None = None) -> dict[str, list]:
    """Default bounds for an ``L``-layer model (layer_end exclusive, always inside the model).

    The warm-up reaches at most a sixth of the generation length (at most 8 tokens): a warm-up
    as long as the answer would leave nothing to skip.
    """
    L = num_layers
    warmup = 8 if not max_new_tokens else min(8, max(1, max_new_tokens // 6))
    return {
        "threshold": [0.80, 0.99],
        "warmup_tokens": [0, warmup],
        "layer_start": [1, max(1, L // 3)],
        "layer_end": [max(2, L - L // 3), L - 1],
        "skip_budget": [1, max(1, L // 2)],
        "dense_every": [2, 8],
    }


def resolve_space(space: SearchSpace, num_layers: int, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Concrete bounds: every key maps to ``[low, high]`` or a fixed value, checked against depth."""
    L = num_layers
    if L < 3:
        raise ConfigError("model", f"has {L} decoder layers; skipping needs at least 3")
    defaults = default_bounds(L, max_new_tokens)
    out: dict[str, Any] = {}
    for name in SPACE_KEYS:
        value = getattr(space, name)
        out[name] = defaults[name] if value is None else value

    def lo(name):
        v = out[name]
        return v[0] if isinstance(v, list) else v

    def hi(name):
        v = out[name]
        return v[1] if isinstance(v, list) else v

    if hi("layer_start") >= L:
        raise ConfigError("search_space.layer_start", f"must stay below the model's {L} layers; got {out['layer_start']!r}")
    if hi("layer_end") > L:
        raise ConfigError("search_space.layer_end", f"must be at most the model's {L} layers (exclusive end); got {out['layer_end']!r}")
    if lo("layer_start") >= hi("layer_end"):
        raise ConfigError(
            "search_space.layer_end",
            f"{out['layer_end']!r} leaves no layer above layer_start {out['layer_start']!r} in a {L}-layer model",
        )
    # A start at or above the highest end can never be used: cap it.
    if isinstance(out["layer_start"], list) and out["layer_start"][1] >= hi("layer_end"):
        out["layer_start"] = [out["layer_start"][0], hi("layer_end") - 1]
    if lo("skip_budget") > hi("layer_end") - lo("layer_start"):
        raise ConfigError(
            "search_space.skip_budget",
            f"{out['skip_budget']!r} is wider than any band the layer bounds allow "
            f"(at most {hi('layer_end') - lo('layer_start')} layers)",
        )
    return out


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """Define-by-run sampling of one policy's fields; returns the fixed (not searched) ones.

    ``layer_end`` is sampled above the trial's ``layer_start``, ``skip_budget`` within the
    trial's band width, so every suggestion is a valid policy.
    """
    fixed: dict[str, Any] = {}
    values: dict[str, Any] = {}

    def draw(name: str, low=None, high=None):
        bounds = space[name]
        if not isinstance(bounds, list):
            fixed[name] = bounds
            values[name] = bounds
            return bounds
        lo_, hi_ = bounds
        lo_ = lo_ if low is None else max(lo_, low)
        hi_ = hi_ if high is None else min(hi_, high)
        if lo_ > hi_:  # the other fields left no room: the nearest valid value
            lo_ = hi_
        if name in FLOAT_KEYS:
            v = trial.suggest_float(name, float(lo_), float(hi_))
        else:
            v = trial.suggest_int(name, int(lo_), int(hi_))
        values[name] = v
        return v

    draw("threshold")
    draw("warmup_tokens")
    start = draw("layer_start")
    end = draw("layer_end", low=start + 1)
    draw("skip_budget", high=end - start)
    draw("dense_every")
    return fixed


def policy_from_params(params: dict[str, Any], seed: int = 0) -> SkipPolicy:
    """The adaptive SkipPolicy of one trial (keys outside the searched fields are ignored)."""
    values = {k: params[k] for k in SPACE_KEYS if k in params}
    return SkipPolicy(mode="adaptive", seed=seed, **values)


def _clamp(name: str, value: float, space: dict[str, Any]):
    bounds = space[name]
    if not isinstance(bounds, list):
        return bounds
    lo, hi = bounds
    v = min(max(value, lo), hi)
    return float(v) if name in FLOAT_KEYS else int(round(v))


def paper_points(space: dict[str, Any], num_layers: int, max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """The method's published settings (``method.md``, section 2), mapped to an ``L``-layer model
    and ``max_new_tokens``, clamped into the resolved search space ``space``:

    * the authors' code: threshold 0.95, 5 cold layers at each end, warm-up ``max_len // 64``,
      every 6th token dense, a budget of 5 of 40 layers (the paper's second-smallest);
    * the same band with the paper's smallest budget (2 of 40 layers) and a 5-10% warm-up;
    * the paper's LLaMA-2-7B band ``[10, 29)`` of 32 layers, with the lower threshold its 25-35%
      points imply (0.91), a 7.5% warm-up and a budget of 12 of 40 layers.

    Only searched fields are set (a fixed field keeps its value); every point is a valid policy
    for the band the search allows (``layer_end`` above ``layer_start``, the budget within the band).
    """
    L = num_layers
    T = max_new_tokens or 24
    raw = [
        {"threshold": 0.95, "warmup_tokens": T // 64, "layer_start": 5, "layer_end": L - 5,
         "skip_budget": 5 * L / 40, "dense_every": 6},
        {"threshold": 0.95, "warmup_tokens": max(1, round(0.075 * T)), "layer_start": 5, "layer_end": L - 5,
         "skip_budget": max(1, 2 * L / 40), "dense_every": 6},
        {"threshold": 0.91, "warmup_tokens": max(1, round(0.075 * T)), "layer_start": 10 * L / 32,
         "layer_end": 29 * L / 32, "skip_budget": 12 * L / 40, "dense_every": 6},
    ]
    out: list[dict[str, Any]] = []
    for point in raw:
        v = {name: _clamp(name, point[name], space) for name in SPACE_KEYS}
        # The dependent fields as suggest() draws them: the end above the start, the budget within the band.
        v["layer_end"] = max(v["layer_end"], v["layer_start"] + 1)
        v["layer_end"] = _clamp("layer_end", v["layer_end"], space)
        if v["layer_end"] <= v["layer_start"]:
            continue  # the space allows no band containing this point's start
        v["skip_budget"] = max(1, min(v["skip_budget"], v["layer_end"] - v["layer_start"]))
        searched = {k: x for k, x in v.items() if isinstance(space[k], list)}
        if searched and searched not in out:
            out.append(searched)
    return out
