"""What one replica does per request, without HTTP framework or Ray: validate against the model,
tokenise, submit to the :class:`~serve.engine_loop.BatchEngine`, build OpenAI responses and SSE
chunks, record metrics, check keys, swap the policy.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import logging
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from ffnskip.decode import GenerationError, SamplingParams, context_length, encode_prompt
from ffnskip.policy import PolicyError

from . import policies
from .config import ServeArgs
from .engine_loop import BatchEngine, DoneItem, EngineClosed, ErrorItem, GenRequest, Overloaded, TokenItem, TorchThread
from .metrics import ServeMetrics
from .policies import PolicyEntry, PolicyHolder, PolicySourceError
from .protocol import (
    SSE_DONE,
    APIError,
    GenerationRequest,
    ResponseMeta,
    chunk,
    ffnskip_info,
    full_response,
    invalid,
    new_id,
    overloaded,
    sse,
    unauthorized,
    usage,
    usage_chunk,
)

log = logging.getLogger(__name__)

ENV_API_KEY = "FFNSKIP_API_KEY"
ENV_ADMIN_KEY = "FFNSKIP_ADMIN_KEY"


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


def _check_text(text: str, param: str) -> None:
    """Text a tokenizer can take: no lone UTF-16 surrogates (JSON's "\ud800" escapes decode to them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"'{param}' is not valid Unicode text: {exc.reason} at position {exc.start}", param=param,
                      code="invalid_value") from None


class Service:
    """One replica's request handling around a loaded model."""

    def __init__(self, args: ServeArgs, model, tokenizer, entry: PolicyEntry, *, api_key: str | None = None,
                 admin_key: str | None = None, thread: TorchThread | None = None):
        from ffnskip.adapters import get_adapter

        self.args = args
        self.name = args.name
        self.model = model
        self.tokenizer = tokenizer
        # The engine thread detokenises with ``tokenizer``; requests are tokenised on the event
        # loop with a copy (a fast tokenizer must not be used from two threads at once).
        self.front_tokenizer = copy.deepcopy(tokenizer)
        self.num_layers = len(get_adapter(model).layers(model))
        self.context = context_length(model)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.vocab_size = getattr(emb, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
        self.api_key = api_key or None
        self.admin_key = admin_key or None
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise ValueError(f"{ENV_ADMIN_KEY} must differ from {ENV_API_KEY}: every client could swap the policy")
        policies.check_for_model(entry.policy, self.num_layers)
        self.holder = PolicyHolder(entry)
        self.metrics = ServeMetrics()
        self._cancel_metrics()
        self.engine = BatchEngine(model, tokenizer, max_batch_size=args.max_batch_size,
                                  batch_wait_s=args.batch_wait_ms / 1000.0, max_queued=args.max_queued_requests,
                                  prefill_chunk=args.prefill_chunk, on_batch=self.metrics.batch_size.observe,
                                  thread=thread).start()
        self._torch_thread = thread
        self.started = time.time()
        #: Set by the deployment: which replica answers (``/healthz``).
        self.replica_id: str | None = None
        #: Set by the deployment: shares a swap with the other replicas, returns its version.
        self.publish: Callable[[PolicyEntry], Awaitable[int | None]] | None = None

    def _cancel_metrics(self) -> None:
        """Requests given up before they finished (the client left, or their deadline passed), and
        what their rows had computed then: the engine drops a cancelled row at its next step, so
        ``max_tokens`` minus that is work the replica did not do."""
        from prometheus_client import Counter

        r = self.metrics.registry
        self.cancelled = Counter("ffnskip_requests_cancelled", "Generation requests cancelled before they finished, "
                                 "by reason (disconnected, timeout)", ["reason"], registry=r)
        self.cancelled_tokens = Counter("ffnskip_cancelled_tokens_computed", "Tokens the engine had generated for "
                                        "requests when they were cancelled", registry=r)
        self.cancelled_saved = Counter("ffnskip_cancelled_tokens_saved", "Tokens of max_tokens that cancelled "
                                       "requests did not generate (their rows left the batch)", registry=r)

    def _cancel(self, greq: GenRequest, reason: str) -> None:
        """Cancel a request that has not finished, once, and count it."""
        if greq.finished or greq.cancelled:
            return
        greq.cancel(reason)
        self.cancelled.labels(reason).inc()
        done = greq.completion
        self.cancelled_tokens.inc(done)
        self.cancelled_saved.inc(max(0, greq.params.max_new_tokens - done))

    @classmethod
    def load(cls, args: ServeArgs, entry: PolicyEntry | None = None) -> "Service":
        """Load the model named by ``args`` and start serving it (keys from the environment)."""
        import torch

        import ffnskip
        from ffnskip.fastpath import prepare

        torch.set_num_threads(args.threads)
        entry = entry or policies.startup_entry(args)
        runner = TorchThread(args.threads)  # loads the model, then runs the decode loop (TorchThread says why)

        def load():
            model, tokenizer = ffnskip.load_model(args.model, dtype=args.dtype, device=args.device)
            started = time.monotonic()
            backend = prepare(model)  # the kernel build and weight packing, not inside the first request
            log.info("decode prepared in %.1f s (matmuls: %s)", time.monotonic() - started, backend)
            return model, tokenizer

        try:
            model, tokenizer = runner.run(load)
            return cls(args, model, tokenizer, entry, api_key=os.environ.get(ENV_API_KEY),
                       admin_key=os.environ.get(ENV_ADMIN_KEY), thread=runner)
        except BaseException:
            runner.stop()
            raise

    def close(self) -> None:
        self.engine.close()
        if self._torch_thread is not None:
            self._torch_thread.stop()

    # ------------------------------------------------------------------ auth
    def check_api_key(self, authorization: str | None) -> None:
        if self.api_key and not _same(_bearer(authorization), self.api_key):
            raise unauthorized()

    def check_admin_key(self, authorization: str | None) -> None:
        if not self.admin_key:
            raise APIError(403, f"policy swaps are disabled: set {ENV_ADMIN_KEY} on the server",
                           type="permission_error", code="admin_disabled")
        if not _same(_bearer(authorization), self.admin_key):
            raise unauthorized("missing or invalid admin key: pass it as 'Authorization: Bearer ADMIN_KEY'")

    # ------------------------------------------------------------------ info endpoints
    def health(self) -> dict[str, Any]:
        if not self.engine.alive:
            raise APIError(503, "the engine thread is not running", type="server_error", code="engine_down")
        return {"status": "ok", "model": self.name, "policy_id": self.holder.current.policy_id,
                "running": self.engine.running, "waiting": self.engine.waiting, "replica": self.replica_id}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.name, "object": "model", "created": int(self.started), "owned_by": "ffnskip",
            "ffnskip": {"model": self.args.model, "num_layers": self.num_layers, "context_length": self.context,
                        "policy_id": self.holder.current.policy_id},
        }]}

    # ------------------------------------------------------------------ tokenizer endpoints (lm-eval)
    def tokenizer_info(self) -> dict[str, Any]:
        """What lm-evaluation-harness's remote tokenizer asks for (``GET /tokenizer_info``)."""
        tok = self.front_tokenizer
        return {
            "eos_token": getattr(tok, "eos_token", None),
            "bos_token": getattr(tok, "bos_token", None),
            "pad_token": getattr(tok, "pad_token", None),
            "chat_template": getattr(tok, "chat_template", None),
            "model_max_length": self.context,
            "vocab_size": self.vocab_size,
        }

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /tokenize {"prompt": str, "add_special_tokens": bool}`` -> ``{"tokens": [...]}``."""
        text = body.get("prompt")
        if not isinstance(text, str):
            raise invalid("'prompt' must be a string", param="prompt", code="invalid_type")
        if len(text) > self.args.max_prompt_chars:
            raise invalid(f"'prompt' is {len(text)} characters; at most {self.args.max_prompt_chars}", param="prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise invalid("'add_special_tokens' must be a boolean", param="add_special_tokens", code="invalid_type")
        _check_text(text, "prompt")
        try:
            try:
                ids = list(self.front_tokenizer(text, add_special_tokens=special)["input_ids"])
            except TypeError:  # a tokenizer without the keyword
                ids = list(self.front_tokenizer(text)["input_ids"])
        except Exception as exc:  # noqa: BLE001 - whatever the tokenizer refuses is the request's fault
            raise invalid(f"the prompt could not be tokenised: {exc}", param="prompt") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": self.context}

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /detokenize {"tokens": [...]}`` -> ``{"prompt": str}``."""
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise invalid("'tokens' must be an array of token ids", param="tokens", code="invalid_type")
        if self.vocab_size and any(t >= self.vocab_size for t in ids):
            raise invalid(f"'tokens' has an id outside the vocabulary of {self.vocab_size}", param="tokens")
        return {"prompt": self.front_tokenizer.decode(ids, skip_special_tokens=False)}

    async def score(self, req: GenerationRequest) -> dict[str, Any]:
        """A completions request with ``echo`` and ``logprobs``: the prompt's token log-probabilities
        from one dense pass of the model (no skipping: loglikelihood tasks measure the dense model),
        and with ``max_tokens`` 1 the greedy next token, in OpenAI's legacy ``logprobs`` object. The
        pass runs on the engine thread between decode steps."""
        from ffnskip.eval import prompt_logprobs

        if req.model is not None and req.model not in (self.name, self.args.model):
            raise APIError(400, f"unknown model '{req.model}'; this server serves '{self.name}'", param="model",
                           code="model_not_found")
        ids = await asyncio.to_thread(self._prompt_ids, req)
        n, extra = len(ids), req.max_tokens or 0
        if self.context is not None and n + extra > self.context:
            raise invalid(f"the prompt ({n} tokens) + max_tokens ({extra}) exceed the model's context window of "
                          f"{self.context} tokens", param=req.prompt_param, code="context_length_exceeded")
        k = req.logprobs or 0
        try:
            fut = self.engine.call(lambda: prompt_logprobs(self.model, ids, k=k))
        except EngineClosed as exc:
            raise APIError(503, str(exc), type="server_error", code="engine_down") from None
        lp = await asyncio.wrap_future(fut)
        tok = self.front_tokenizer

        def piece(t: int) -> str:
            return tok.decode([t], skip_special_tokens=False)

        all_ids, token_lps, tops = list(ids), list(lp.token_logprobs), list(lp.top)
        if extra:
            nxt, nxt_lp = lp.next_top[0]
            all_ids.append(nxt)
            token_lps.append(nxt_lp)
            tops.append(lp.next_top[:k])
        tokens = [piece(t) for t in all_ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        logprobs = {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": [None if top is None else {piece(t): v for t, v in top} for top in tops],
            "text_offset": offsets,
        }
        text = tok.decode(all_ids, skip_special_tokens=False) if req.echo else "".join(tokens[n:])
        self.metrics.prompt_tokens.inc(n)
        meta = ResponseMeta(new_id(req.kind), req.kind, self.name)
        out = full_response(meta, text, "length", usage(n, extra), ffnskip_info("dense (prompt scoring)", None))
        out["choices"][0]["logprobs"] = logprobs
        return out

    def policy_view(self) -> dict[str, Any]:
        e = self.holder.current
        out = e.to_dict()
        out["resolved"] = e.policy.resolve(self.num_layers).to_dict()
        out["version"] = self.holder.version
        out["allow_override"] = self.args.allow_policy_override
        return out

    def render_metrics(self) -> bytes:
        self.metrics.running.set(self.engine.running)
        self.metrics.waiting.set(self.engine.waiting)
        return self.metrics.render()

    # ------------------------------------------------------------------ policy swaps
    async def swap_policy(self, body: dict[str, Any]) -> dict[str, Any]:
        """``PUT /v1/policy``: ``{"policy": {...}}``, ``{"trial_id": N}`` or ``{"study": "S"}``
        (optional ``policy_id``; ``max_quality_drop`` / ``objective`` with ``study``)."""
        allowed = {"policy", "trial_id", "study", "policy_id", "max_quality_drop", "objective"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise invalid(f"unknown field '{unknown[0]}'; give one of policy, trial_id, study", param=unknown[0])
        given = [k for k in ("policy", "trial_id", "study") if body.get(k) is not None]
        if len(given) != 1:
            raise invalid("give exactly one of 'policy' (an object), 'trial_id' or 'study'", param="policy",
                          code="missing_required_parameter" if not given else "invalid_value")
        pid = body.get("policy_id")
        if pid is not None and (not isinstance(pid, str) or not pid.strip()):
            raise invalid("'policy_id' must be a non-empty string", param="policy_id")
        try:
            if "policy" in given:
                if not isinstance(body["policy"], dict):
                    raise invalid("'policy' must be an object (a skip policy)", param="policy", code="invalid_type")
                entry = policies.from_dict(body["policy"], pid, kind="json")
            elif "trial_id" in given:
                tid = body["trial_id"]
                if isinstance(tid, bool) or not isinstance(tid, int) or tid <= 0:
                    raise invalid("'trial_id' must be a positive integer", param="trial_id", code="invalid_type")
                entry = await asyncio.to_thread(policies.from_trial, self.args.db, tid, pid)
            else:
                study = body["study"]
                if not isinstance(study, str) or not study.strip():
                    raise invalid("'study' must be a non-empty string", param="study", code="invalid_type")
                mqd = body.get("max_quality_drop", self.args.max_quality_drop)
                if mqd is not None and (isinstance(mqd, bool) or not isinstance(mqd, (int, float))):
                    raise invalid("'max_quality_drop' must be a number", param="max_quality_drop", code="invalid_type")
                objective = body.get("objective") or self.args.objective
                entry = await asyncio.to_thread(policies.from_study, self.args.db, study, max_quality_drop=mqd,
                                                objective=objective, policy_id=pid)
            policies.check_for_model(entry.policy, self.num_layers)
        except PolicyError as exc:
            raise invalid(str(exc), param=f"policy.{exc.field}", code="invalid_policy") from None
        except PolicySourceError as exc:
            raise APIError(exc.status, str(exc), param=exc.param, code=exc.code,
                           type="invalid_request_error" if exc.status < 500 else "server_error") from None
        version = None
        if self.publish is not None:
            version = await self.publish(entry)
        self.holder.swap(entry, version)
        self.metrics.policy_swaps.inc()
        log.info("policy swapped to %s", entry.policy_id)
        return self.policy_view()

    def apply_shared(self, version: int, entry: PolicyEntry) -> bool:
        """A swap made on another replica (newer ``version``): apply it here."""
        if version <= self.holder.version:
            return False
        self.holder.swap(entry, version)
        self.metrics.policy_swaps.inc()
        return True

    # ------------------------------------------------------------------ generation
    def prepare(self, req: GenerationRequest) -> GenRequest:
        """Check a parsed request against the model; the engine request (not yet submitted)."""
        if req.model is not None and req.model not in (self.name, self.args.model):
            raise APIError(400, f"unknown model '{req.model}'; this server serves '{self.name}'", param="model",
                           code="model_not_found")
        entry = self.holder.current
        if req.policy_override is not None:
            if not self.args.allow_policy_override:
                raise APIError(403, "per-request policies are disabled on this server", type="permission_error",
                               param="ffnskip_policy", code="policy_override_disabled")
            try:
                entry = policies.from_dict(req.policy_override, kind="request")
                policies.check_for_model(entry.policy, self.num_layers)
            except PolicyError as exc:
                raise invalid(str(exc), param=f"ffnskip_policy.{exc.field}", code="invalid_policy") from None
        if req.ignore_eos and not self.args.allow_ignore_eos:
            raise APIError(403, "ignore_eos is disabled on this server", type="permission_error", param="ignore_eos",
                           code="ignore_eos_disabled")
        limit = self.args.max_tokens_limit
        if limit is not None and req.max_tokens is not None and req.max_tokens > limit:
            raise invalid(f"max_tokens ({req.max_tokens}) is above this server's limit of {limit}", param="max_tokens")
        ids = self._prompt_ids(req)
        n = len(ids)
        ctx = self.context
        param = req.prompt_param
        if ctx is not None and n >= ctx:
            raise invalid(f"the prompt is {n} tokens; the model's context window is {ctx} tokens", param=param,
                          code="context_length_exceeded")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = self.args.default_max_tokens if ctx is None else min(self.args.default_max_tokens, ctx - n)
            if limit is not None:
                max_tokens = min(max_tokens, limit)
        elif ctx is not None and n + max_tokens > ctx:
            raise invalid(f"max_tokens ({max_tokens}) + the prompt ({n} tokens) exceed the model's context window "
                          f"of {ctx} tokens", param="max_tokens", code="context_length_exceeded")
        try:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    top_k=req.top_k, seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos)
        except GenerationError as exc:
            raise invalid(str(exc)) from None
        return GenRequest(ids, params, entry)

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The request's prompt as token ids (chat template for chat), checked against the caps."""
        param = req.prompt_param
        chars = len(req.prompt) if isinstance(req.prompt, str) else sum(len(str(m.get("content", ""))) for m in req.messages or [])
        if chars > self.args.max_prompt_chars:
            raise invalid(f"the prompt is {chars} characters; this server accepts at most {self.args.max_prompt_chars}",
                          param=param, code="context_length_exceeded")
        try:
            if req.kind == "chat":
                ids = encode_prompt(self.front_tokenizer, req.messages)
            elif isinstance(req.prompt, str):
                ids = encode_prompt(self.front_tokenizer, req.prompt, raw=True)
            else:
                ids = list(req.prompt or [])
                if self.vocab_size and any(t >= self.vocab_size for t in ids):
                    raise invalid(f"'prompt' has a token id outside the vocabulary of {self.vocab_size}", param=param)
        except APIError:
            raise
        except GenerationError as exc:
            raise invalid(str(exc), param=param) from None
        except Exception as exc:  # e.g. a chat template refusing a role order
            raise invalid(f"the prompt could not be tokenised: {exc}", param=param) from None
        if not ids:
            raise invalid("the prompt has no tokens", param=param)
        return ids

    async def submit_async(self, req: GenerationRequest) -> tuple[GenRequest, ResponseMeta]:
        """:meth:`submit` with the tokenisation (and chat templating) in a worker thread, so a long
        prompt does not stall the event loop that streams the other requests' tokens."""
        self.check_room()  # a full replica answers 429 at once, without tokenising first
        greq = await asyncio.to_thread(self.prepare, req)
        return self._submit(req, greq)

    def check_room(self) -> None:
        """429 now if the engine would refuse the request (its running batch and queue are full);
        the engine's own check at submission stays the one that counts."""
        try:
            self.engine.check_room()
        except Overloaded as exc:
            raise overloaded(str(exc)) from None

    def submit(self, req: GenerationRequest) -> tuple[GenRequest, ResponseMeta]:
        return self._submit(req, self.prepare(req))

    def _submit(self, req: GenerationRequest, greq: GenRequest) -> tuple[GenRequest, ResponseMeta]:
        try:
            self.engine.submit(greq)
        except Overloaded as exc:
            raise overloaded(str(exc)) from None
        except EngineClosed as exc:
            raise APIError(503, str(exc), type="server_error", code="engine_down") from None
        self.metrics.prompt_tokens.inc(len(greq.prompt_ids))
        echo = ""
        if req.kind == "completion" and req.echo:
            echo = req.prompt if isinstance(req.prompt, str) else self.front_tokenizer.decode(greq.prompt_ids)
        return greq, ResponseMeta(new_id(req.kind), req.kind, self.name, echo=echo,
                                  include_usage=req.stream and req.include_usage)

    def _deadline(self, greq: GenRequest) -> float:
        return greq.created + self.args.request_timeout_s

    async def _next(self, greq: GenRequest):
        left = self._deadline(greq) - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return await asyncio.wait_for(greq.next_item(), left)

    def _observe_token(self, greq: GenRequest, item: TokenItem, last: float | None) -> float:
        self.metrics.tokens.inc()
        if last is None:
            self.metrics.ttft.observe(max(0.0, item.at - greq.created))
        else:
            self.metrics.itl.observe(max(0.0, item.at - last))
        return item.at

    def _error_of(self, item: ErrorItem) -> APIError:
        exc = item.error
        if isinstance(exc, GenerationError):
            return invalid(str(exc))
        if isinstance(exc, EngineClosed):
            return APIError(503, str(exc), type="server_error", code="engine_down")
        log.error("generation failed: %s: %s", type(exc).__name__, exc)  # the details stay in the log
        return APIError(500, "generation failed (logged on the server)", type="server_error", code="internal_error")

    def _timeout(self) -> APIError:
        return APIError(504, f"the request did not finish within {self.args.request_timeout_s:g} s",
                        type="server_error", code="timeout")

    async def complete(self, greq: GenRequest, meta: ResponseMeta) -> dict[str, Any]:
        """Wait for the whole completion (a submitted request)."""
        last = None
        try:
            while True:
                try:
                    item = await self._next(greq)
                except TimeoutError:
                    self._cancel(greq, "timeout")
                    raise self._timeout() from None
                if isinstance(item, TokenItem):
                    last = self._observe_token(greq, item, last)
                elif isinstance(item, DoneItem):
                    return self._final(greq, meta, item, stream=False)
                else:
                    raise self._error_of(item)
        finally:
            self._cancel(greq, "disconnected")

    def _final(self, greq: GenRequest, meta: ResponseMeta, item: DoneItem, stream: bool):
        if item.stats is not None:
            self.metrics.skip_ratio.observe(item.stats.skip_ratio)
        use = usage(len(greq.prompt_ids), item.completion_tokens)
        info = ffnskip_info(greq.entry.policy_id, item.stats)
        if stream:  # the finish chunk; the usage follows in its own chunk when asked for
            return chunk(meta, "" if meta.kind == "completion" else None, item.finish_reason, info=info)
        return full_response(meta, item.text, item.finish_reason, use, info)

    async def stream(self, greq: GenRequest, meta: ResponseMeta, on_status: Callable[[str], None]) -> AsyncIterator[bytes]:
        """SSE body of a submitted request; ``on_status`` gets '200', 'cancelled', '504' or '500'."""
        status = "cancelled"
        last = None
        try:
            if meta.kind == "chat":
                yield sse(chunk(meta, "", role=True))
            elif meta.echo:
                yield sse(chunk(meta, meta.echo))
            while True:
                try:
                    item = await self._next(greq)
                except TimeoutError:
                    self._cancel(greq, "timeout")
                    err = self._timeout()
                    status = str(err.status)
                    yield sse(err.body())
                    yield SSE_DONE
                    return
                if isinstance(item, TokenItem):
                    last = self._observe_token(greq, item, last)
                    if item.delta:
                        yield sse(chunk(meta, item.delta))
                elif isinstance(item, DoneItem):
                    status = "200"
                    if item.tail:
                        yield sse(chunk(meta, item.tail))
                    yield sse(self._final(greq, meta, item, stream=True))
                    if meta.include_usage:
                        info = ffnskip_info(greq.entry.policy_id, item.stats)
                        yield sse(usage_chunk(meta, usage(len(greq.prompt_ids), item.completion_tokens), info))
                    yield SSE_DONE
                    return
                else:
                    err = self._error_of(item)
                    status = str(err.status)
                    yield sse(err.body())
                    yield SSE_DONE
                    return
        finally:
            self._cancel(greq, "disconnected")
            on_status(status)
