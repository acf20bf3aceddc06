"""The serving configuration: the typed argument of the Ray Serve app builder (:func:`serve.app.app`).

``serve run serve.app:app model=smollm2-135m policy=policy.json`` and the ``args:`` block of
``serve/config.yaml`` are validated into :class:`ServeArgs` by Ray Serve itself (a pydantic model
is how Serve types builder arguments); ``ffnskip serve`` builds one from its flags. Errors name
the key.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Sources of the start-up policy (at most one).
POLICY_SOURCES = ("policy", "policy_json", "study")


class ServeArgs(BaseModel):
    """Arguments of the ffnskip Serve application."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())

    # ------------------------------------------------------------------ model
    model: str = "smollm2-135m"
    """Model alias, HF directory or .gguf file (as for ``ffnskip generate --model``)."""
    served_model_name: str | None = None
    """Name clients pass as ``model`` (default: ``model``)."""
    dtype: str | None = None
    """float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)."""
    device: str | None = None
    """cpu | cuda (default: cuda when available)."""

    # ------------------------------------------------------------------ policy
    policy: str | None = None
    """Start-up skip policy: a JSON policy file."""
    policy_json: str | None = None
    """Start-up skip policy: inline JSON."""
    study: str | None = None
    """Start-up skip policy: the best trial of this study in the SQL store (``db``)."""
    db: str | None = None
    """SQL store URL for ``study`` and for ``PUT /v1/policy {"trial_id"}`` swaps
    (default: $FFNSKIP_DB or sqlite:///ffnskip.db)."""
    max_quality_drop: float | None = None
    """``study``: the quality constraint of the ``best`` rule (default: the study's own)."""
    objective: str = "speedup"
    """``study``: what the recommendation rule maximises among the trials that qualify
    (speedup | skip_ratio | tokens_per_s)."""
    policy_id: str | None = None
    """Identifier reported as ``ffnskip.policy_id`` (default: derived from the source)."""
    allow_policy_override: bool = True
    """Accept a per-request ``ffnskip_policy`` field."""
    allow_ignore_eos: bool = True
    """Accept ``ignore_eos`` (a client can then hold a row for its whole ``max_tokens``)."""
    max_tokens_limit: int | None = Field(None, ge=1)
    """Largest ``max_tokens`` a request may ask for (default: the model's context window)."""
    max_prompt_chars: int = Field(200_000, ge=1)
    """Longest prompt (all message contents together) accepted, in characters, before tokenising."""

    # ------------------------------------------------------------------ capacity
    num_replicas: int = Field(1, ge=1)
    """Replicas of the deployment."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per replica (Ray resource)."""
    torch_threads: int | None = Field(None, ge=1)
    """Torch intra-op threads per replica (default: ``num_cpus`` rounded up)."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Sequences decoded together in one batch."""
    batch_wait_ms: float = Field(30.0, ge=0, le=10_000)
    """How long the engine waits for more requests before starting a batch."""
    prefill_chunk: int = Field(256, ge=1, le=65_536)
    """Prompt tokens of a request joining a running batch processed per engine step: a long prompt
    is prefilled in chunks so the running streams keep getting a token every step."""
    max_queued_requests: int = Field(32, ge=0)
    """Generation requests a replica keeps waiting for a batch slot; more get 503."""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Ray's per-replica request cap (all endpoints); default: max_batch_size +
    max_queued_requests + 16, so the replica's own JSON 503 answers overload first."""
    proxy_queue: int = Field(64, ge=-1)
    """Ray's ``max_queued_requests``: requests held by the proxy when every replica is at its cap
    (-1 = unbounded); beyond it Ray itself answers 503."""
    request_timeout_s: float = Field(300.0, gt=0)
    """Per-request deadline (queueing + decoding); then 504 (or an error event when streaming)."""
    default_max_tokens: int = Field(256, ge=1)
    """``max_tokens`` when a request leaves it out (clamped to the context window)."""
    share_policy_swaps: bool = True
    """Propagate ``PUT /v1/policy`` to every replica through a deployment-scoped actor."""
    policy_sync_s: float = Field(1.0, gt=0)
    """How often a replica checks for a policy swapped on another replica."""

    @model_validator(mode="after")
    def _check(self) -> "ServeArgs":
        given = [k for k in POLICY_SOURCES if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(POLICY_SOURCES)}; got {', '.join(given)}")
        if not self.model.strip():
            raise ValueError("model must be a non-empty string")
        return self

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def ray_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or (self.max_batch_size + self.max_queued_requests + 16)

    @property
    def threads(self) -> int:
        import math

        return self.torch_threads or max(1, math.ceil(self.num_cpus))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()
