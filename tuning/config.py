"""Study configuration: a YAML file, validated, with command-line overrides.

Every error names the key as it is written in the file (``search_space.layer_end``,
``resources.gpu``) and says what is allowed. Model-dependent checks (bounds inside the model's
depth) happen when the study starts and the depth is known (:mod:`tuning.space`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ffnskip.errors import FFNSkipError

#: Objectives a study can optimise (at least one; quality first when present). ``speedup`` is the
#: policy's tokens/s over dense's, measured alternately in the trial (what the recommendation
#: rule maximises); ``tokens_per_s`` is the policy's own speed.
OBJECTIVES = ("quality", "skip_ratio", "tokens_per_s", "speedup")
#: Default objectives (studies stored before ``speedup`` existed used these).
DEFAULT_OBJECTIVES = ("quality", "skip_ratio", "tokens_per_s")
#: ``quality_metric`` values: the task's primary metric, or fidelity to the dense model's output:
#: ``output_identity`` (the whole output identical to dense's), ``answer_agreement_short`` (the
#: short answers agree: first line / sentence, SQuAD-normalised), ``rouge_l_vs_dense``.
QUALITY_METRICS = ("primary", "output_identity", "answer_agreement_short", "rouge_l_vs_dense")
#: Former names of quality metrics, read as the current ones (``answer_agreement`` meant the
#: whole output identical to dense's: ``output_identity``).
RENAMED_QUALITY_METRICS = {"answer_agreement": "output_identity"}
SAMPLERS = ("tpe", "nsga2")
#: ``scheduler.kind`` values: ``asha`` (successive halving over the number of samples) or ``none``.
SCHEDULERS = ("asha", "none")
#: Searchable SkipPolicy fields, in sampling order.
SPACE_KEYS = ("threshold", "warmup_tokens", "layer_start", "layer_end", "skip_budget", "dense_every")
DEFAULT_EVALUATOR = "ffnskip.eval:evaluate"
#: Former names of evaluators, read as the current ones (a study stored before the harness moved
#: to ``ffnskip.eval`` keeps resuming).
RENAMED_EVALUATORS = {"ffnskip.evaluate:evaluate": DEFAULT_EVALUATOR}


class ConfigError(FFNSkipError, ValueError):
    """An invalid configuration value; ``key`` names it as written in the file."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_keys(data: dict, cls, prefix: str = "") -> None:
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown key; known keys are {', '.join(known)}")


@dataclass
class Resources:
    """What one trial reserves on the Ray cluster."""

    cpu: float = 1.0
    """CPUs per trial (> 0); also the number of torch threads of the trial's worker."""

    gpu: float = 0.0
    """GPUs per trial, fractional allowed: 0.5 runs two trials per GPU. 0 = CPU only."""

    def __post_init__(self) -> None:
        if not _is_num(self.cpu) or self.cpu <= 0:
            raise ConfigError("resources.cpu", f"must be a number > 0; got {self.cpu!r}")
        if not _is_num(self.gpu) or self.gpu < 0:
            raise ConfigError("resources.gpu", f"must be a number >= 0; got {self.gpu!r}")
        if self.gpu > 1 and not float(self.gpu).is_integer():
            raise ConfigError("resources.gpu", f"above 1 must be a whole number of GPUs; got {self.gpu!r}")
        self.cpu, self.gpu = float(self.cpu), float(self.gpu)


@dataclass
class Scheduler:
    """Successive halving over the number of samples (Ray Tune's ASHA scheduler).

    A trial is evaluated on rungs of growing sample counts, ``min_samples``,
    ``min_samples * reduction_factor``, ... and finally the study's ``limit``; after each rung the
    scheduler stops it unless it ranks in the best ``1 / reduction_factor`` of the trials that
    reached that rung (score: the skip ratio when the quality drop is within ``max_quality_drop``,
    else minus the excess drop). The rungs before the last measure quality only (no speed runs,
    no teacher-forced NLL); the last one is the full evaluation. A stopped trial is stored as
    ``pruned`` and never recommended.
    """

    kind: str = "asha"
    """``asha`` or ``none`` (every trial on all samples)."""
    min_samples: int = 4
    """Samples of the first rung (>= 1)."""
    reduction_factor: float = 2
    """Rung growth and the share kept per rung (> 1): 2 keeps the better half."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULERS:
            raise ConfigError("scheduler.kind", f"must be one of {', '.join(SCHEDULERS)}; got {self.kind!r}")
        if not _is_int(self.min_samples) or self.min_samples < 1:
            raise ConfigError("scheduler.min_samples", f"must be a positive integer; got {self.min_samples!r}")
        if not _is_num(self.reduction_factor) or self.reduction_factor <= 1:
            raise ConfigError("scheduler.reduction_factor", f"must be a number > 1; got {self.reduction_factor!r}")
        self.reduction_factor = float(self.reduction_factor)

    def rungs(self, total: int) -> list[tuple[float, int]]:
        """The rungs of a study on ``total`` samples: ``(t, samples)`` pairs, the last one
        ``(total, total)``. ``t = min_samples * reduction_factor ** k`` is what the trial reports
        to the scheduler (exactly ASHA's milestones); ``samples`` is ``ceil(t)``."""
        out: list[tuple[float, int]] = []
        k = 0
        while self.kind != "none":
            t = self.min_samples * self.reduction_factor ** k
            if t >= total:
                break
            n = math.ceil(t - 1e-9)
            if n < total and (not out or n > out[-1][1]):
                out.append((t, n))
            k += 1
        return out + [(float(total), total)]


@dataclass
class SearchSpace:
    """Bounds of the searched SkipPolicy fields. Each is ``[low, high]`` (inclusive), a single value
    (fixed, not searched) or ``null`` (default bounds derived from the model's depth)."""

    threshold: Any = None
    """Cosine threshold tau (float). Default [0.80, 0.99]."""
    warmup_tokens: Any = None
    """Dense warm-up tokens per sequence (int). Default [0, min(8, max_new_tokens // 6)]."""
    layer_start: Any = None
    """First skip-eligible layer (int, >= 0). Default [1, L // 3]."""
    layer_end: Any = None
    """End of the eligible band, exclusive (int, <= L). Default [L - L // 3, L - 1]. Always sampled
    above the trial's layer_start."""
    skip_budget: Any = None
    """FFNs skipped per triggered token (int, >= 1). Default [1, L // 2], capped per trial at the
    width of its band."""
    dense_every: Any = None
    """Every n-th post-warm-up token is dense (int, 0 = never). Default [2, 8]."""

    def __post_init__(self) -> None:
        for name in SPACE_KEYS:
            value = getattr(self, name)
            key = f"search_space.{name}"
            is_float = name == "threshold"
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                if len(value) != 2:
                    raise ConfigError(key, f"must be [low, high], a single value or null; got {value!r}")
                lo, hi = value
                for v in (lo, hi):
                    _check_space_value(key, name, v, is_float)
                if lo > hi:
                    raise ConfigError(key, f"low {lo} is above high {hi}")
                setattr(self, name, [float(lo), float(hi)] if is_float else [lo, hi])
            else:
                _check_space_value(key, name, value, is_float)
                if is_float:
                    setattr(self, name, float(value))
        s, e = self.layer_start, self.layer_end
        s_lo = s[0] if isinstance(s, list) else s
        e_hi = e[1] if isinstance(e, list) else e
        if s_lo is not None and e_hi is not None and s_lo >= e_hi:
            raise ConfigError("search_space.layer_end", f"must allow values above layer_start ({s_lo}); got {e!r}")


def _check_space_value(key: str, name: str, v: Any, is_float: bool) -> None:
    if is_float:
        if not _is_num(v) or not -1.0 <= v <= 2.0:
            raise ConfigError(key, f"must be numbers in [-1, 2]; got {v!r}")
        return
    if not _is_int(v):
        raise ConfigError(key, f"must be integers; got {v!r}")
    low = {"skip_budget": 1, "layer_end": 1}.get(name, 0)
    if v < low:
        raise ConfigError(key, f"must be >= {low}; got {v}")


@dataclass
class TuningConfig:
    """One study: what to evaluate, what to search, how to run it."""

    study: str | None = None
    """Study name (unique in the database). Default: the config file's name without .yaml."""
    db: str | None = None
    """Database URL; ``--db`` and ``$FFNSKIP_DB`` override it. Default sqlite:///ffnskip.db."""

    model: str = "smollm2-135m"
    """Model alias, Hugging Face directory, .gguf file or hub id (as for ``ffnskip generate``)."""
    dtype: str | None = None
    """float32 | bfloat16 | float16; default float32 on CPU, bfloat16 on CUDA."""
    device: str | None = None
    """cpu | cuda; default cuda when the trial's worker has a GPU."""

    task: str = "factoid_qa"
    """Evaluation task (as for ``ffnskip evaluate``)."""
    limit: int | None = 30
    """Evaluate on the first N examples (null = all)."""
    data_file: str | None = None
    """A user data file (JSONL/CSV) instead of the task's shared data set."""
    fields: dict[str, str] | None = None
    """Column mapping of ``data_file`` (e.g. {question: q, answer: a})."""
    data_dir: str | None = None
    """Shared data directory; default $FFNSKIP_DATA_DIR or ../shared/data."""
    chat: bool | None = None
    """Wrap prompts in the model's chat template (null: the task's default)."""
    max_new_tokens: int | None = None
    """Generation length; default: the task's."""
    batch_size: int = 1
    """Sequences decoded together in the evaluation passes (faster on a GPU). The speed
    measurement (tokens_per_s) decodes one prompt at a time whatever this is."""
    seed: int = 0
    """Seed of the sampler, the data order and the policies' random baseline."""

    trials: int = 12
    """Trials in the study in total (``--resume`` runs only the ones missing)."""
    concurrency: int = 2
    """Trials running at the same time."""
    resources: Resources = field(default_factory=Resources)
    """Per trial: ``cpu`` and (fractional) ``gpu``."""
    sampler: str = "tpe"
    """Optuna sampler: ``tpe`` (multi-objective TPE) or ``nsga2``."""
    startup_trials: int | None = None
    """TPE: random trials before the model kicks in. Default min(10, max(2, trials // 3))."""
    population_size: int | None = None
    """NSGA-II: population size. Default max(4, min(50, trials // 3))."""

    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    """Objectives, any of quality, skip_ratio, tokens_per_s, speedup (quality follows its metric's
    direction; the others are maximised)."""
    quality_metric: str = "primary"
    """``primary`` (the task's own metric, e.g. factoid accuracy) or a fidelity metric against the
    dense output: ``output_identity``, ``answer_agreement_short``, ``rouge_l_vs_dense``
    (``answer_agreement``, the former name of ``output_identity``, is read as it)."""
    max_quality_drop: float | None = 0.05
    """Constraint: quality may fall at most this much below the dense baseline (in the metric's
    units; null = unconstrained). The recommendation (``ffnskip results best``) applies it to the
    upper end of the drop's 95% interval."""
    scheduler: Scheduler | None = None
    """Successive halving over the number of samples (see :class:`Scheduler`), e.g.
    ``{kind: asha, min_samples: 4, reduction_factor: 2}``. Default (null): off, every trial is
    evaluated on all ``limit`` samples."""
    warm_start: bool = True
    """Evaluate the method's published settings first (method.md: the authors' code and the
    paper's 7B band, mapped to the model's depth and clamped into the search space), after
    ``start_points``."""

    search_space: SearchSpace = field(default_factory=SearchSpace)
    """Bounds of the searched policy fields (see :class:`SearchSpace`)."""
    start_points: list[dict[str, Any]] = field(default_factory=list)
    """Policies (searched fields only) evaluated first, e.g. a known-good one."""

    evaluator: str = DEFAULT_EVALUATOR
    """``module:function`` with the signature of :func:`ffnskip.eval.evaluate` (for custom tasks)."""
    progress: bool = True
    """Per-trial progress bars in the workers' output."""

    def __post_init__(self) -> None:
        if self.study is not None:
            _check_name("study", self.study)
        if self.db is not None and (not isinstance(self.db, str) or not self.db.strip()):
            raise ConfigError("db", f"must be a database URL; got {self.db!r}")
        for key in ("model", "task"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(key, f"must be a non-empty string; got {v!r}")
        for key in ("dtype", "device", "data_file", "data_dir"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ConfigError(key, f"must be a string or null; got {v!r}")
        if self.fields is not None and (
            not isinstance(self.fields, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.fields.items())
        ):
            raise ConfigError("fields", f"must be a mapping of names to column names; got {self.fields!r}")
        for key in ("chat", "progress", "warm_start"):
            if not isinstance(getattr(self, key), bool) and not (key == "chat" and self.chat is None):
                raise ConfigError(key, f"must be true or false; got {getattr(self, key)!r}")
        for key, optional in (("limit", True), ("max_new_tokens", True), ("batch_size", False),
                              ("trials", False), ("concurrency", False), ("startup_trials", True),
                              ("population_size", True)):
            v = getattr(self, key)
            if v is None and optional:
                continue
            if not _is_int(v) or v <= 0:
                raise ConfigError(key, f"must be a positive integer{' or null' if optional else ''}; got {v!r}")
        if self.population_size is not None and self.population_size < 2:
            raise ConfigError("population_size", f"must be >= 2; got {self.population_size}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError("seed", f"must be an integer >= 0; got {self.seed!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError("sampler", f"must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if (
            not isinstance(self.objectives, list)
            or not self.objectives
            or any(o not in OBJECTIVES for o in self.objectives)
            or len(set(self.objectives)) != len(self.objectives)
        ):
            raise ConfigError(
                "objectives", f"must be a non-empty list of distinct names among {', '.join(OBJECTIVES)}; got {self.objectives!r}"
            )
        self.quality_metric = RENAMED_QUALITY_METRICS.get(self.quality_metric, self.quality_metric)
        if self.quality_metric not in QUALITY_METRICS:
            raise ConfigError("quality_metric", f"must be one of {', '.join(QUALITY_METRICS)} (answer_agreement, the former "
                              f"name of output_identity, is read as output_identity); got {self.quality_metric!r}")
        if self.max_quality_drop is not None:
            if not _is_num(self.max_quality_drop) or self.max_quality_drop < 0:
                raise ConfigError("max_quality_drop", f"must be a number >= 0 or null; got {self.max_quality_drop!r}")
            self.max_quality_drop = float(self.max_quality_drop)
        if isinstance(self.resources, dict):
            _check_keys(self.resources, Resources, "resources.")
            self.resources = Resources(**self.resources)
        elif not isinstance(self.resources, Resources):
            raise ConfigError("resources", f"must be a mapping with cpu and gpu; got {self.resources!r}")
        if isinstance(self.scheduler, dict):
            _check_keys(self.scheduler, Scheduler, "scheduler.")
            self.scheduler = Scheduler(**self.scheduler)
        elif self.scheduler is not None and not isinstance(self.scheduler, Scheduler):
            raise ConfigError("scheduler", f"must be a mapping (kind, min_samples, reduction_factor) or null; got {self.scheduler!r}")
        if self.scheduler is not None and self.scheduler.kind == "none":
            self.scheduler = None
        if isinstance(self.search_space, dict):
            _check_keys(self.search_space, SearchSpace, "search_space.")
            self.search_space = SearchSpace(**self.search_space)
        elif not isinstance(self.search_space, SearchSpace):
            raise ConfigError("search_space", f"must be a mapping of policy fields to bounds; got {self.search_space!r}")
        if not isinstance(self.start_points, list):
            raise ConfigError("start_points", f"must be a list of policies; got {self.start_points!r}")
        for i, point in enumerate(self.start_points):
            key = f"start_points[{i}]"
            if not isinstance(point, dict) or not point:
                raise ConfigError(key, f"must be a mapping of policy fields to values; got {point!r}")
            for name, value in point.items():
                if name not in SPACE_KEYS:
                    raise ConfigError(f"{key}.{name}", f"unknown field; searched fields are {', '.join(SPACE_KEYS)}")
                _check_space_value(f"{key}.{name}", name, value, name == "threshold")
        if not isinstance(self.evaluator, str) or ":" not in self.evaluator:
            raise ConfigError("evaluator", f"must be 'module:function'; got {self.evaluator!r}")
        self.evaluator = RENAMED_EVALUATORS.get(self.evaluator, self.evaluator)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TuningConfig":
        if not isinstance(data, dict):
            raise ConfigError("<file>", f"must be a YAML mapping of keys to values; got {type(data).__name__}")
        _check_keys(data, cls)
        return cls(**data)

    def replace(self, **overrides: Any) -> "TuningConfig":
        """A copy with some keys replaced (``None`` values are ignored), re-validated."""
        data = self.to_dict()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return TuningConfig.from_dict(data)


def _check_name(key: str, name: Any) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > 255:
        raise ConfigError(key, f"must be a non-empty name of at most 255 characters; got {name!r}")


def load_config(path: str | Path, **overrides: Any) -> TuningConfig:
    """Read a YAML config and apply command-line overrides (``None`` = not given)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError("<file>", f"{p} is not valid YAML: {detail}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("<file>", f"{p} must hold a mapping of keys to values; got {type(data).__name__}")
    _check_keys(data, TuningConfig)
    if data.get("study") is None:
        data["study"] = p.stem
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TuningConfig.from_dict(data)
