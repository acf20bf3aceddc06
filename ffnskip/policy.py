"""Skip policies: the FFN-SkipLLM hyperparameters, validated, JSON round-trippable.

One `SkipPolicy` travels from a tuning trial to a database row to a serving replica. It is
model-independent: `layer_start`, `layer_end` and `skip_budget` may be left as ``None`` (defaults
per method.md §2) or be negative (counted from the end); :meth:`SkipPolicy.resolve` turns it into
concrete layer indices for a model of a given depth.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import FFNSkipError

#: Policy modes. ``adaptive`` is the paper's rule; ``dense`` never skips; ``random`` and
#: ``static`` are the paper's same-budget FFN baselines (method.md §4); ``shortgpt`` and
#: ``skipdecode`` are the whole-layer baselines.
MODES = ("adaptive", "dense", "random", "static", "shortgpt", "skipdecode")

#: Cold layers kept dense at each end by default (the authors' code: 5).
DEFAULT_COLD_LAYERS = 5
#: Default skip budget as a share of the model's layers (method.md: "about 30%").
DEFAULT_BUDGET_SHARE = 0.30


class PolicyError(FFNSkipError, ValueError):
    """A policy field is invalid. ``field`` names it as the user typed it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"policy field '{field}': {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SkipPolicy:
    """When to skip which FFN blocks during decoding (method.md §2)."""

    mode: str = "adaptive"
    """One of ``adaptive`` (cosine-similarity rule), ``dense``, ``random``, ``static``,
    ``shortgpt`` (whole layers of lowest block influence removed) or ``skipdecode``
    (position-based exit schedule)."""

    threshold: float = 0.95
    """Cosine threshold ``tau``: a run of skipped FFNs starts after a layer whose residual before
    and after its FFN have cosine similarity above this value. Above 1 never triggers; -1 always."""

    layer_start: int | None = None
    """First skip-eligible layer (inclusive). ``None``: 5 cold layers, clamped for shallow models.
    Negative values count from the end."""

    layer_end: int | None = None
    """End of the skip-eligible band (exclusive); a run never enters layers ``>= layer_end``.
    ``None``: 5 cold layers at the end, clamped for shallow models. Negative counts from the end."""

    warmup_tokens: int = 32
    """Generated tokens decoded densely at the start of every sequence (attention-sink warm-up)."""

    skip_budget: int | None = None
    """FFNs skipped per triggered token (length of the skip run). ``None``: about 30% of layers,
    at most the width of the eligible band."""

    dense_every: int = 6
    """After warm-up, every n-th generated token is decoded densely (0 = never)."""

    seed: int = 0
    """Seed of the ``random`` baseline's layer choice (per sequence, reproducible)."""

    lagged: bool = False
    """``adaptive`` only: decide each token's skip run from the cosines the *previous* token
    measured (the run starts after the first band layer whose cosine was above ``threshold``),
    read together with the sampled token. One host synchronisation per generated token whatever
    the threshold, for accelerators where each read stalls the device; the default (False) tests
    layer by layer within the token, as the paper does (one read per tested layer)."""

    layers: list[int] | None = None
    """``shortgpt`` only: the whole layers removed (the lowest block influence, measured by the
    profile; see ``ffnskip.baselines.shortgpt_policy``). Negative indices count from the end."""

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise PolicyError("mode", f"must be one of {', '.join(MODES)}; got {self.mode!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise PolicyError("threshold", f"must be a number; got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if not math.isfinite(self.threshold) or not -1.0 <= self.threshold <= 2.0:
            raise PolicyError("threshold", f"must be a finite number in [-1, 2]; got {self.threshold!r}")
        for name in ("layer_start", "layer_end", "skip_budget"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise PolicyError(name, f"must be an integer or null; got {value!r}")
        for name in ("warmup_tokens", "dense_every", "seed"):
            value = getattr(self, name)
            if not _is_int(value):
                raise PolicyError(name, f"must be an integer; got {value!r}")
            if value < 0:
                raise PolicyError(name, f"must be >= 0; got {value}")
        if not isinstance(self.lagged, bool):
            raise PolicyError("lagged", f"must be true or false; got {self.lagged!r}")
        if self.lagged and self.mode != "adaptive":
            raise PolicyError("lagged", f"applies to mode 'adaptive' only; got mode {self.mode!r}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not all(_is_int(v) for v in self.layers):
                raise PolicyError("layers", f"must be a list of integers or null; got {self.layers!r}")
            self.layers = list(self.layers)
            if len(set(self.layers)) != len(self.layers):
                raise PolicyError("layers", f"must not repeat a layer; got {self.layers}")
        if self.mode == "shortgpt" and self.layers is not None and not self.layers:
            raise PolicyError("layers", "mode 'shortgpt' removes at least one layer; use null to measure them")
        if self.layers is not None and self.mode != "shortgpt":
            raise PolicyError("layers", f"applies to mode 'shortgpt' only; got mode {self.mode!r}")
        if self.skip_budget is not None and self.skip_budget < 0:
            raise PolicyError("skip_budget", f"must be >= 0; got {self.skip_budget}")
        if (
            self.layer_start is not None
            and self.layer_end is not None
            and (self.layer_start >= 0) == (self.layer_end >= 0)
            and self.layer_start >= self.layer_end
        ):
            raise PolicyError(
                "layer_end", f"must be greater than layer_start ({self.layer_start}); got {self.layer_end}"
            )

    # ------------------------------------------------------------------ JSON round-trip
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkipPolicy":
        if not isinstance(data, dict):
            raise PolicyError("<policy>", f"must be a JSON object; got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(unknown[0], f"unknown field; known fields are {', '.join(sorted(known))}")
        return cls(**data)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "SkipPolicy":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError("<policy>", f"malformed JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SkipPolicy":
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise PolicyError("<policy file>", f"cannot read {p}: {exc.strerror or exc}") from None
        return cls.from_json(text)

    @classmethod
    def dense(cls) -> "SkipPolicy":
        return cls(mode="dense")

    @classmethod
    def shortgpt(cls, skip_budget: int | None = None, layers: list[int] | None = None) -> "SkipPolicy":
        """ShortGPT: whole layers removed for every pass. ``layers=None``: the ``skip_budget``
        layers of lowest block influence, to be measured on the model
        (:func:`ffnskip.baselines.measured`; default budget: 30% of the layers)."""
        return cls(mode="shortgpt", skip_budget=skip_budget, layers=layers, warmup_tokens=0, dense_every=0)

    @property
    def unmeasured(self) -> bool:
        """A ``shortgpt`` policy whose layers are still to be measured (see :meth:`shortgpt`)."""
        return self.mode == "shortgpt" and self.layers is None

    # ------------------------------------------------------------------ resolution
    def resolve(self, num_layers: int) -> "ResolvedPolicy":
        """Concrete eligible band and budget for a model with ``num_layers`` decoder layers."""
        L = num_layers
        cold = min(DEFAULT_COLD_LAYERS, max(0, (L - 1) // 3))
        start = cold if self.layer_start is None else self.layer_start
        end = L - cold if self.layer_end is None else self.layer_end
        if start < 0:
            start += L
        if end < 0:
            end += L
        if not 0 <= start < L:
            raise PolicyError("layer_start", f"{self.layer_start} is outside a {L}-layer model")
        if not 0 < end <= L:
            raise PolicyError("layer_end", f"{self.layer_end} is outside a {L}-layer model")
        if start >= end:
            raise PolicyError(
                "layer_end", f"resolves to {end}, not above layer_start ({start}) for a {L}-layer model"
            )
        width = end - start
        removed: tuple[int, ...] = ()
        if self.layers is not None:
            norm = sorted(v + L if v < 0 else v for v in self.layers)
            if any(not 0 <= v < L for v in norm):
                raise PolicyError("layers", f"{self.layers} has a layer outside a {L}-layer model")
            removed = tuple(norm)
        if self.mode == "shortgpt":
            if self.layers is None:
                raise PolicyError(
                    "layers", "mode 'shortgpt' without layers: measure them first (ffnskip.baselines.measured)"
                )
            return ResolvedPolicy(self, L, start, end, len(removed), removed)
        if self.skip_budget is None:
            budget = max(1, min(width, round(DEFAULT_BUDGET_SHARE * L)))
        else:
            budget = self.skip_budget
            if budget > width:
                raise PolicyError(
                    "skip_budget",
                    f"{budget} is larger than the eligible band [{start}, {end}) of {width} layers",
                )
        return ResolvedPolicy(self, L, start, end, budget, removed)


def parse_policy(value: "SkipPolicy | dict | str | None" = None, *, path: str | Path | None = None) -> SkipPolicy:
    """The one way user input becomes a :class:`SkipPolicy`: a policy (returned as is), a JSON
    object as a dict, JSON text, or (``path``) a JSON file; nothing: the default adaptive policy.
    ``{"mode": "shortgpt"}`` without ``layers`` is a valid, unmeasured policy (see
    :meth:`SkipPolicy.shortgpt`). Raises :class:`PolicyError` naming the field."""
    if path is not None:
        if value is not None:
            raise PolicyError("<policy>", "give a policy or a file, not both")
        return SkipPolicy.load(path)
    if value is None:
        return SkipPolicy()
    if isinstance(value, SkipPolicy):
        return value
    if isinstance(value, str):
        return SkipPolicy.from_json(value)
    if isinstance(value, dict):
        return SkipPolicy.from_dict(value)
    raise PolicyError("<policy>", f"must be a SkipPolicy, a JSON object or JSON text; got {type(value).__name__}")


@dataclass(frozen=True)
class ResolvedPolicy:
    """A :class:`SkipPolicy` bound to a model depth: every index concrete and in range."""

    policy: SkipPolicy
    num_layers: int
    start: int
    end: int
    budget: int
    removed: tuple[int, ...] = ()
    """``shortgpt``: the layers removed outright."""

    @property
    def mode(self) -> str:
        return self.policy.mode

    def token_budget(self, t: int) -> int:
        """FFNs that may be skipped for generated token ``t`` (0-based, per sequence).

        Token 0 is produced by the prefill pass, which is always dense.
        """
        p = self.policy
        if p.mode == "shortgpt":
            return self.budget  # static removal: every pass, the prompt included
        if p.mode == "dense" or t == 0 or t < p.warmup_tokens:
            return 0
        if p.dense_every and (t - p.warmup_tokens) % p.dense_every == p.dense_every - 1:
            return 0
        return self.budget

    @property
    def test_layers(self) -> range:
        """Layers after which the adaptive test may start a run: ``start - 1 .. end - 2`` (a run
        starts at the next layer, inside the band)."""
        return range(max(0, self.start - 1), self.end - 1)

    def run_after(self, layer: int, k: int) -> range:
        """The FFNs a run of budget ``k`` skips when the test after ``layer`` fires: layers
        ``layer + 1 ..``, at most ``k`` of them, never into the cold end (``>= end``)."""
        return range(layer + 1, min(layer + k, self.end - 1) + 1)

    def skipdecode_layers(self, t: int, max_new_tokens: int) -> range:
        """SkipDecode's position-based schedule: whole layers skipped for generated token ``t``.

        The number of skipped layers grows linearly with the position over the post-warm-up
        tokens, from 0 to ``2k`` (clamped to the band), so the mean is about ``k``; the
        skipped layers are the *lowest* of the band (SkipDecode skips lower layers, and a
        monotone schedule means no later token needs the K/V they did not refine).
        """
        k = self.token_budget(t)
        if k == 0:
            return range(0)
        W = self.policy.warmup_tokens
        span = max(1, max_new_tokens - max(W, 1))
        pos = (t - max(W, 1)) / span  # 0 .. ~1 over the post-warm-up tokens
        n = min(self.end - self.start, int(round(pos * 2 * k)))
        return range(self.start, self.start + n)

    def to_dict(self) -> dict[str, Any]:
        return {"layer_start": self.start, "layer_end": self.end, "skip_budget": self.budget}
