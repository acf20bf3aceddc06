"""The one decode path: ``prefill``, ``decode_one_token``, ``generate`` (a generator of tokens).

Shared by the CLI, the evaluator, the benchmarks and the server. Small plain functions in the
style of gpt-fast's ``generate.py``; the model's own forward pass runs every layer, and a
:class:`~ffnskip.engine.SkipController` attached to it decides which FFNs to skip.

Host-device synchronisations on the hot path, per decode step (all through
:func:`ffnskip.sync.to_host`, all counted in ``SeqStats.host_syncs``):
* reading the sampled tokens in :func:`generate`: 1 (the tokens are needed on the host for EOS,
  stop strings and streaming text); with ``lagged`` adaptive the step's cosines come with them;
* the eager adaptive controller: 1 per tested layer while some row still holds a skip budget
  (see :mod:`ffnskip.engine`).
Nothing else in a decode step waits for the device: the skip plan's row indices go up in one
asynchronous upload (:func:`ffnskip.sync.upload`); on CUDA the fast path is tested under
``torch.cuda.set_sync_debug_mode("error")``. (The model's own forward, used for the prompt and for
families the fast path does not cover, may synchronise inside transformers.)
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .engine import SeqStats, SkipController
from .fastpath import FastDecoder
from .policy import SkipPolicy
from .sync import to_host

log = logging.getLogger(__name__)


class GenerationError(ValueError):
    """Bad generation input (empty prompt, bad sampling settings, prompt too long...)."""


@dataclass
class SamplingParams:
    """How the next token is chosen."""

    max_new_tokens: int = 64
    """Generated tokens per sequence at most (> 0)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    seed: int | None = None
    """Seed of the sampler (sampling is reproducible with it)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation of a sequence ends before the first occurrence of any."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0; got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0; got {self.top_k!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)


@dataclass
class SequenceResult:
    """One sequence's output, updated live while it is generated."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    """``stop`` (EOS or a stop string), ``length`` or ``cancelled``."""
    stats: SeqStats | None = None
    _emitted: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = {"text": self.text, "finish_reason": self.finish_reason, "prompt_tokens": len(self.prompt_ids)}
        if self.stats is not None:
            out.update(self.stats.to_dict())
        return out


@dataclass
class TokenEvent:
    """One generated token of one sequence."""

    row: int
    token_id: int
    delta: str
    """Text that became final with this token (may be empty: held back for detokenisation or a
    possible stop string)."""
    finished: bool
    result: SequenceResult


# ---------------------------------------------------------------------- prompts
def encode_prompt(tokenizer, prompt: str | list[dict[str, str]], raw: bool = False) -> list[int]:
    """Token ids of a prompt: the chat template when the tokenizer has one (unless ``raw``),
    else exactly ``tokenizer(prompt)``. A list of ``{"role", "content"}`` messages always uses
    the chat template."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            text = "\n".join(m["content"] for m in prompt)
            return list(tokenizer(text)["input_ids"])
        return _apply_chat(tokenizer, prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationError("prompt must be a non-empty string")
    if not raw and getattr(tokenizer, "chat_template", None):
        return _apply_chat(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt)["input_ids"])


def _apply_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def context_length(model: nn.Module) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ---------------------------------------------------------------------- forward passes
_CACHE_KW: dict[type, str] = {}


def _cache_kwarg(model: nn.Module) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    cls = type(model)
    if cls not in _CACHE_KW:
        params = inspect.signature(model.forward).parameters
        _CACHE_KW[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW[cls]


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _forward(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_kwarg(model): cache},
    )
    return out.logits[:, -1, :]  # [B, V]


def prefill(model, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """The prompt pass (always dense): input_ids [B, S] -> next-token logits [B, V]."""
    return _forward(model, input_ids, attention_mask, position_ids, cache)


def decode_one_token(model, tokens, attention_mask, position_ids, cache, ctl: SkipController | None = None) -> torch.Tensor:
    """One decode step: tokens [B, 1] -> next-token logits [B, V]; K/V of every layer appended.

    ``cache`` is a transformers cache (the model's own forward runs, with the controller's hooks
    attached) or a :class:`~ffnskip.fastpath.FastDecoder` (the lean step, the same arithmetic up to float rounding).
    """
    if isinstance(cache, FastDecoder):
        return cache.step(tokens, position_ids, attention_mask, ctl)
    return _forward(model, tokens, attention_mask, position_ids, cache)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> tokens [B] (greedy when temperature == 0)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > params.top_p  # keep the smallest set with mass >= p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------- text
def _update_text(result: SequenceResult, tokenizer, stops: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """Re-detokenise; return (new final text, stop string hit)."""
    full = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    hit = False
    if stops:
        lo = max(0, result._emitted - max(len(s) for s in stops))
        cut = min((i for i in (full.find(s, lo) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            full, hit, final = full[:cut], True, True
    safe = len(full)
    if not final:
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe = len(full.rstrip("\ufffd"))
        if stops:
            safe = min(safe, len(full) - (max(len(s) for s in stops) - 1))
    safe = max(safe, result._emitted)
    delta = full[result._emitted : safe]
    result._emitted = safe
    result.text = full[:safe] if not final else full
    return delta, hit


# ---------------------------------------------------------------------- generate
@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    policy: SkipPolicy | None = None,
    params: SamplingParams | None = None,
    *,
    results: list[SequenceResult] | None = None,
    cache=None,
    fast: bool | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[TokenEvent]:
    """Generate for a batch of tokenised prompts, yielding every token as it is produced.

    ``results`` (optional, filled in place) receives one :class:`SequenceResult` per prompt,
    whose ``text`` and ``stats`` are final once the generator is exhausted. ``cache`` (optional)
    is an empty transformers ``Cache`` to fill instead of a new ``DynamicCache``. ``fast``:
    decode steps on the lean path of :mod:`ffnskip.fastpath` (None = whenever it supports the
    model; then the prompt's K/V move to its pre-allocated cache after the prefill).
    ``cancelled(row)`` (optional) is asked after each token of each live row; a row it answers
    True for ends with ``finish_reason="cancelled"`` and computes nothing more (a server stops the
    generation of a client that went away this way).
    """
    policy = policy or SkipPolicy.dense()
    params = params or SamplingParams()
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise GenerationError("every prompt must have at least one token")
    ctx = context_length(model)
    longest = max(len(p) for p in prompt_ids)
    if ctx is not None and longest + params.max_new_tokens > ctx:
        raise GenerationError(
            f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"model's context of {ctx} tokens"
        )
    device = next(model.parameters()).device
    B = len(prompt_ids)
    ctl = SkipController(model, policy, prompt_ids, max_new_tokens=params.max_new_tokens)
    seqs = [SequenceResult(prompt_ids=list(p), stats=ctl.stats[i]) for i, p in enumerate(prompt_ids)]
    if results is not None:
        results.clear()
        results.extend(seqs)
    eos = set() if params.ignore_eos else eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    # Left-pad the batch: input_ids / attention_mask [B, S]; positions count real tokens only.
    S = longest
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, S), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        input_ids[i, S - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, S - len(p) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
    cache = new_cache(model) if cache is None else cache
    active = [True] * B
    ones = torch.ones((B, 1), dtype=attention_mask.dtype, device=device)

    with ctl.attached():
        ctl.begin_prefill()
        logits = prefill(model, input_ids, attention_mask, position_ids, cache)  # [B, V]
        step_cache = cache
        if fast is not False:
            why_not = FastDecoder.supports(model, S + params.max_new_tokens)
            if why_not is None:
                step_cache = FastDecoder(model, B, S + params.max_new_tokens, padded=min(map(len, prompt_ids)) < S)
                step_cache.load_prefill(cache)
            elif fast:
                raise GenerationError(f"the fast decode path does not support this model: {why_not}")
        t = 0
        while True:
            next_tokens = sample(logits, params, generator)  # [B]
            cosines = ctl.pending_cosines()  # lagged adaptive only: [B, M] on the device, else None
            if cosines is None:
                tokens_host = to_host(next_tokens)  # HOST SYNC: 1 per step (EOS, stop strings, text)
            else:
                # HOST SYNC: still 1 per step, the tokens and the step's cosines in one transfer
                # (float64 holds every token id exactly).
                packed = to_host(torch.cat([next_tokens[:, None].double(), cosines.double()], dim=1))  # [B][1 + M]
                tokens_host = [int(row[0]) for row in packed]
                ctl.accept_cosines([row[1:] for row in packed])
            ctl.end_step(active, syncs=1)
            for r in range(B):
                if not active[r]:
                    continue
                seq = seqs[r]
                tok = tokens_host[r]
                is_eos = tok in eos
                if not is_eos:
                    seq.token_ids.append(tok)
                done = is_eos or t + 1 >= params.max_new_tokens
                delta, hit = _update_text(seq, tokenizer, params.stop, final=done)
                if hit:
                    done = True
                cancel = not done and cancelled is not None and cancelled(r)
                if done or cancel:
                    seq.finish_reason = "cancelled" if cancel else "stop" if (is_eos or hit) else "length"
                    done = True
                    active[r] = False
                    ctl.finish(r)
                yield TokenEvent(r, tok, delta, done, seq)
            t += 1
            if not any(active):
                break
            attention_mask = torch.cat([attention_mask, ones], dim=1)  # [B, S + t]
            position_ids = position_ids[:, -1:] + 1  # [B, 1]
            ctl.begin_step([t] * B)
            logits = decode_one_token(model, next_tokens[:, None], attention_mask, position_ids, step_cache, ctl)


def generate_text(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    policy: SkipPolicy | None = None,
    params: SamplingParams | None = None,
    *,
    raw: bool = False,
) -> tuple[list[SequenceResult], float]:
    """Convenience wrapper: texts and stats of a batch, and the decode tokens/s of the batch."""
    ids = [encode_prompt(tokenizer, p, raw=raw) for p in prompts]
    results: list[SequenceResult] = []
    start = time.perf_counter()
    for _ in generate(model, tokenizer, ids, policy, params, results=results):
        pass
    elapsed = time.perf_counter() - start
    total = sum(r.stats.generated_tokens for r in results)
    return results, (total / elapsed if elapsed > 0 else 0.0)
