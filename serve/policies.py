"""Where the served skip policy comes from, its identifier, and the swappable holder.

A :class:`PolicyEntry` is a validated :class:`~ffnskip.policy.SkipPolicy` with a ``policy_id``
(reported in every response) and a description of its source. Sources: a JSON file, inline JSON,
a study in the SQL store (the recommendation rule of ``ffnskip results best``,
:func:`tuning.objectives.recommend`: the fastest trial that is faster than dense within the
quality drop at 95%, else dense, with the reason logged and kept in the source), or one stored
trial. The ``tuning`` package is imported only when the store is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ffnskip.errors import FFNSkipError
from ffnskip.policy import PolicyError, SkipPolicy, parse_policy

log = logging.getLogger(__name__)


class PolicySourceError(FFNSkipError, ValueError):
    """The policy source cannot give a policy (one line for the user). ``status``: HTTP status."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_policy", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


def policy_hash(policy: SkipPolicy) -> str:
    """Content hash of a policy (8 hex digits): equal policies get equal ids."""
    return hashlib.sha256(json.dumps(policy.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class PolicyEntry:
    policy: SkipPolicy
    policy_id: str
    source: dict[str, Any] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"policy_id": self.policy_id, "policy": self.policy.to_dict(), "source": dict(self.source),
                "loaded_at": self.loaded_at}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PolicyEntry":
        return cls(SkipPolicy.from_dict(d["policy"]), d["policy_id"], dict(d.get("source") or {}),
                   float(d.get("loaded_at") or time.time()))


def check_for_model(policy: SkipPolicy, num_layers: int | None) -> None:
    """Raise :class:`~ffnskip.policy.PolicyError` if the policy does not fit the model's depth."""
    if num_layers:
        policy.resolve(num_layers)


# ---------------------------------------------------------------------- sources
def from_file(path: str, policy_id: str | None = None) -> PolicyEntry:
    pol = parse_policy(path=path)  # PolicyError names the file or the field
    return PolicyEntry(pol, policy_id or f"file:{Path(path).name}@{policy_hash(pol)}", {"kind": "file", "path": str(path)})


def from_json(text: str, policy_id: str | None = None) -> PolicyEntry:
    pol = parse_policy(text)
    return PolicyEntry(pol, policy_id or f"json:{policy_hash(pol)}", {"kind": "json"})


def from_dict(data: Any, policy_id: str | None = None, kind: str = "json") -> PolicyEntry:
    pol = parse_policy(data) if isinstance(data, dict) else SkipPolicy.from_dict(data)
    return PolicyEntry(pol, policy_id or f"{kind}:{policy_hash(pol)}", {"kind": kind})


def default_entry() -> PolicyEntry:
    pol = SkipPolicy()
    return PolicyEntry(pol, f"default:{policy_hash(pol)}", {"kind": "default"})


def _store_url(db: str | None) -> str:
    from tuning.store import default_url

    return db or default_url()


def from_study(db: str | None, study: str, *, max_quality_drop: float | None = None,
               objective: str = "speedup", policy_id: str | None = None) -> PolicyEntry:
    """The policy the study recommends (``ffnskip results best``'s rule): its fastest trial that is
    faster than dense within the quality drop at 95%, else dense. The verdict's reason is logged
    and kept in the entry's ``source`` (``verdict``, ``reason``, the numbers and their intervals)."""
    from tuning.results import recommendation
    from tuning.store import StoreError, display_url

    url = _store_url(db)
    try:
        view, verdict = recommendation(url, study, max_quality_drop=max_quality_drop, objective=objective)
    except StoreError as exc:
        raise PolicySourceError(f"study '{study}' in {display_url(url)}: {exc}", status=404, code="study_not_found",
                                param="study") from None
    except ValueError as exc:  # a bad objective
        raise PolicySourceError(str(exc), param="objective") from None
    source: dict[str, Any] = {"kind": "study", "study": study, "db": display_url(url),
                              "verdict": "dense" if verdict.dense else "policy", "reason": verdict.reason,
                              "max_quality_drop": verdict.max_quality_drop}
    if verdict.dense:
        log.warning("study '%s': serving the dense policy: %s", study, verdict.reason)
        pol = SkipPolicy.dense()
        return PolicyEntry(pol, policy_id or f"study:{study}/dense", {**source, "trial_id": None})
    trial = verdict.trial
    try:
        pol = SkipPolicy.from_dict(trial.policy)
    except PolicyError as exc:
        raise PolicySourceError(f"trial {trial.id} of study '{study}' holds an invalid policy: {exc}") from None
    log.info("study '%s': serving trial %s: %s", study, trial.id, verdict.reason)
    return PolicyEntry(pol, policy_id or f"study:{study}/trial:{trial.id}",
                       {**source, "trial_id": trial.id, "skip_ratio": trial.skip_ratio,
                        "quality_drop": trial.quality_drop,
                        "quality_drop_ci95": None if trial.quality_drop_high is None else [trial.quality_drop_low,
                                                                                            trial.quality_drop_high],
                        "speedup": trial.speedup,
                        "speedup_ci95": None if trial.speedup_low is None else [trial.speedup_low, trial.speedup_high],
                        "n": trial.n})


def from_trial(db: str | None, trial_id: int, policy_id: str | None = None) -> PolicyEntry:
    """One stored trial (completed or not: the operator chose it)."""
    from tuning.store import Store, StoreError, display_url

    url = _store_url(db)
    try:
        with Store(url, must_exist=True) as store:
            trial = store.get_trial(trial_id)
    except StoreError as exc:
        code = "trial_not_found" if "no trial" in str(exc) else "store_unavailable"
        raise PolicySourceError(f"{display_url(url)}: {exc}", status=404 if code == "trial_not_found" else 503,
                                code=code, param="trial_id") from None
    try:
        pol = SkipPolicy.from_dict(trial.policy)
    except PolicyError as exc:
        raise PolicySourceError(f"trial {trial_id} holds an invalid policy: {exc}", param="trial_id") from None
    return PolicyEntry(pol, policy_id or f"trial:{trial_id}",
                       {"kind": "trial", "trial_id": trial_id, "db": display_url(url), "status": trial.status,
                        "skip_ratio": trial.skip_ratio, "quality_drop": trial.quality_drop})


def startup_entry(args) -> PolicyEntry:
    """The start-up policy of :class:`~serve.config.ServeArgs` (raises PolicyError / PolicySourceError)."""
    if args.policy:
        return from_file(args.policy, args.policy_id)
    if args.policy_json:
        return from_json(args.policy_json, args.policy_id)
    if args.study:
        return from_study(args.db, args.study, max_quality_drop=args.max_quality_drop, objective=args.objective,
                          policy_id=args.policy_id)
    entry = default_entry()
    return PolicyEntry(entry.policy, args.policy_id or entry.policy_id, entry.source)


class PolicyHolder:
    """The replica's current policy: swapped atomically; a request keeps the entry it started with."""

    def __init__(self, entry: PolicyEntry, version: int = 0):
        self._lock = threading.Lock()
        self._entry = entry
        self._version = version

    @property
    def current(self) -> PolicyEntry:
        return self._entry

    @property
    def version(self) -> int:
        return self._version

    def swap(self, entry: PolicyEntry, version: int | None = None) -> PolicyEntry:
        with self._lock:
            old = self._entry
            self._entry = entry
            self._version = self._version + 1 if version is None else version
            return old
