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
import torch.nn.functional as F
from torch import nn

from . import kernels
from .engine import SeqStats, SkipController
from .errors import FFNSkipError
from .fastpath import FastDecoder, prefill_kernels
from .policy import SkipPolicy
from .sync import to_host, upload

log = logging.getLogger(__name__)


class GenerationError(FFNSkipError, ValueError):
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
    row: int = 0
    """The row's id in its decode session (its index among the prompts of :func:`generate`)."""
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
    """The prompt pass (always dense): input_ids [B, S] -> next-token logits [B, V].

    In bf16 on an AVX2 or AVX512_BF16 CPU its linears run the decode steps' kernel
    (:func:`ffnskip.fastpath.prefill_kernels`): 2-3.5x faster than ``F.linear`` in bf16 on an AVX2
    CPU, up to 1.7x on Zen 4 for short prompts (on par from ~256 tokens)."""
    with prefill_kernels(model):
        return _forward(model, input_ids, attention_mask, position_ids, cache)


def decode_one_token(model, tokens, attention_mask, position_ids, cache, ctl: SkipController | None = None) -> torch.Tensor:
    """One decode step: tokens [B, 1] -> next-token logits [B, V]; K/V of every layer appended.

    ``cache`` is a transformers cache (the model's own forward runs, with the controller's hooks
    attached) or a :class:`~ffnskip.fastpath.FastDecoder` (the lean step, the same arithmetic up to float rounding).
    """
    if isinstance(cache, FastDecoder):
        return cache.step(tokens, position_ids, attention_mask, ctl)
    return _forward(model, tokens, attention_mask, position_ids, cache)


# ---------------------------------------------------------------------- joining transformers caches
def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros before it along ``dim`` (-1 or -2) up to ``width`` entries (>= its own)."""
    return F.pad(t, [0, 0] * (-dim - 1) + [width - t.shape[dim], 0])


def mergeable(cache) -> bool:
    """Whether rows can join ``cache`` (:func:`merge_caches`): every layer a plain ``DynamicLayer``
    or ``DynamicSlidingWindowLayer`` of transformers (not recording its past)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    kinds = (DynamicLayer, DynamicSlidingWindowLayer)
    return bool(layers) and all(type(x) in kinds and x.is_initialized and not getattr(x, "record_past", False) for x in layers)


def merge_caches(cache, other) -> None:
    """Append the rows of ``other`` to ``cache`` (:func:`mergeable`, one model), right-aligned: the
    side with fewer columns gets zero (masked) columns first, so every row ends at the same column.
    A sliding-window layer stores only its last min(N, window - 1) columns and counts N in
    ``cumulative_length``: both sides are padded to the wider stored width, N is the larger. (Its
    mask is column-based and each row's real tokens are its last columns: the window is kept.)"""
    for a, b in zip(cache.layers, other.layers):
        width = max(a.keys.shape[-2], b.keys.shape[-2])
        a.keys = torch.cat([_left_pad(a.keys, width, -2), _left_pad(b.keys, width, -2)])  # [B + R, Hkv, width, hd]
        a.values = torch.cat([_left_pad(a.values, width, -2), _left_pad(b.values, width, -2)])
        if a.is_sliding:
            a.cumulative_length = max(a.cumulative_length, b.cumulative_length)


def drop_columns(cache, n: int) -> None:
    """Drop the first ``n`` (>= 0) columns, padding for every row, of a :func:`mergeable` cache."""
    for layer in cache.layers:
        stored = layer.keys.shape[-2]
        if layer.is_sliding:
            layer.cumulative_length -= n
        keep = min(stored, layer.cumulative_length) if layer.is_sliding else stored - n
        layer.keys = layer.keys[:, :, stored - keep :]  # [B, Hkv, keep, hd]
        layer.values = layer.values[:, :, stored - keep :]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> tokens [B] (greedy when temperature == 0)."""
    if params.temperature == 0:
        return kernels.greedy(logits)  # logits.argmax(dim=-1), faster on CPU once a kernel library is loaded
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
class Detokenizer:
    """Incremental detokenisation of one row: each new token decodes a short window of ids (the
    prefix/read offsets of TGI and vLLM), not the whole row, and text is released only once it
    no longer ends in an incomplete multi-byte character. ``text`` is what became final."""

    __slots__ = ("tokenizer", "ids", "prefix", "read", "text")

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already released (context for the next)
        self.read = 0
        self.text = ""

    def _window(self) -> tuple[str, str]:
        dec = self.tokenizer.decode
        return dec(self.ids[self.prefix : self.read], skip_special_tokens=True), dec(self.ids[self.prefix :], skip_special_tokens=True)

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        before, now = self._window()
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def flush(self) -> None:
        """The row ended: release whatever is left (an incomplete character included)."""
        before, now = self._window()
        if len(now) > len(before):
            self.text += now[len(before) :]
        self.prefix = self.read = len(self.ids)


def _update_text(result: SequenceResult, full: str, stops: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """``full``: the row's text so far. Returns (text that became final with this token, stop
    string hit); holds back what could still begin a stop string."""
    hit = False
    if stops:
        lo = max(0, result._emitted - max(len(s) for s in stops))
        cut = min((i for i in (full.find(s, lo) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            full, hit, final = full[:cut], True, True
    safe = len(full)
    if not final and stops:
        safe = min(safe, len(full) - (max(len(s) for s in stops) - 1))
    safe = max(safe, result._emitted)
    delta = full[result._emitted : safe]
    result._emitted = safe
    result.text = full[:safe] if not final else full
    return delta, hit


# ---------------------------------------------------------------------- the decode session
@dataclass
class _Row:
    """One sequence of a session: what it was asked for and where it stands."""

    id: int
    result: SequenceResult
    params: SamplingParams
    eos: set[int]
    generator: torch.Generator | None
    detok: Detokenizer
    start: int = 0
    """The cache column where its prompt begins (the columns before it are padding)."""
    passes: int = 0
    """Decode passes run for it (the pass that produces token t is pass t; the prompt pass gives 0)."""


@dataclass
class _Prefill:
    """The prompt pass of rows that join together: one left-padded batch with its own transformers
    cache, run ``done`` of its ``width`` columns so far."""

    rows: list[_Row]
    ids: torch.Tensor  # [R, S] prompts, left-padded
    mask: torch.Tensor  # [R, S] 1 = a real token
    pos: torch.Tensor  # [R, S] positions (real tokens counted)
    cache: Any
    pre: SkipController  # the prompt pass's own controller: dense (begin_prefill)
    width: int  # S
    done: int = 0
    logits: torch.Tensor | None = None  # [R, V] after the last column


#: Default of ``DecodeSession(prefill_chunk=...)``: prompt columns per step while a batch runs.
PREFILL_CHUNK = 256


def check_prefill_chunk(value: int | None) -> int | None:
    """``prefill_chunk``: a positive integer, or None (a joining prompt's pass runs whole)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise GenerationError(f"prefill_chunk must be a positive integer (prompt tokens per step) or None; got {value!r}")
    return value


class DecodeSession:
    """One running batch: the controller, the cache, the fast-path choice, masks and positions,
    and the once-per-step read of the device. Shared by :func:`generate`, the teacher-forced
    scoring of the evaluator and the server's batcher.

    Rows are added with :meth:`add` and join at a later :meth:`step`, after their prompt pass
    (dense; the waiting rows as one left-padded batch in its own transformers cache). A fresh or
    drained session runs it in one go (nothing decodes, so nothing waits); while rows decode, each
    step runs ``prefill_chunk`` more of its columns (positions continuing) and the running rows
    still get their token: a prompt of S tokens joins after ``ceil(S / prefill_chunk)`` steps; rows
    added meanwhile wait for the next pass. Then the rows are appended right-aligned (every row
    ends at the same cache column, the shorter side left-padded and masked) to the fast path's
    cache (:meth:`FastDecoder.join`) or to the model's own transformers cache
    (:func:`merge_caches`, sliding-window layers included). Rows leave as soon as they finish (EOS,
    their ``max_new_tokens``, a stop string, cancellation) and compute nothing more. Sampling
    (:class:`SamplingParams`) and skip decisions (the controller's) are per row.

    Host-device synchronisations per step: one, :func:`ffnskip.sync.to_host` of the sampled tokens
    (with the lagged rule's cosines), plus the eager adaptive test's (see :mod:`ffnskip.engine`);
    joining, leaving and the prompt chunks add none of their own.
    """

    def __init__(self, model: nn.Module, tokenizer, policy: SkipPolicy | None = None, *, fast: bool | None = None,
                 cache=None, cancelled: Callable[[int], bool] | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy or SkipPolicy.dense()
        self.fast = fast
        self.cancelled = cancelled
        """``cancelled(row_id)`` is asked after each token of a live row; True ends it (``cancelled``)."""
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        self.device = next(model.parameters()).device
        self.context = context_length(model)
        self.ctl = SkipController(model, self.policy, [], max_new_tokens=[])
        self.rows: list[_Row] = []  # in batch order
        self.waiting: list[_Row] = []
        self._prefill: _Prefill | None = None  # the joining rows' prompt pass in progress
        self.cache = None  # a transformers cache (the model's own forward) or a FastDecoder
        self._given_cache = cache
        self.mask: torch.Tensor | None = None  # [B, N] 1 = a real token
        self.positions: torch.Tensor | None = None  # [B, 1] position of each row's last token
        self.logits: torch.Tensor | None = None  # [B, V] each row's next-token distribution
        self._tokens: torch.Tensor | None = None  # [B] sampled, waiting for their decode pass
        self._ids = 0
        self._pad_id = (getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None) or 0

    # ------------------------------------------------------------------ rows
    @property
    def fast_path(self) -> bool:
        return isinstance(self.cache, FastDecoder)

    @property
    def can_join(self) -> bool:
        """Whether rows added now can join the running batch (else they wait for it to drain): on
        the fast path and on a transformers ``DynamicCache`` (:func:`mergeable`), not on a cache
        the caller passed in of another kind."""
        return not self.rows or self.fast_path or mergeable(self.cache)

    @property
    def prefilling(self) -> list[_Row]:
        """Rows whose prompt pass is in progress (chunked, see the class docstring)."""
        return list(self._prefill.rows) if self._prefill is not None else []

    @property
    def done(self) -> bool:
        return not self.rows and not self.waiting and self._prefill is None

    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> SequenceResult:
        """Queue one prompt; returns its result (filled live). Its row id is ``result.row``."""
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise GenerationError("every prompt must have at least one token")
        if self.context is not None and len(prompt_ids) + params.max_new_tokens > self.context:
            raise GenerationError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                f"model's context of {self.context} tokens"
            )
        generator = None
        if params.temperature > 0:  # one generator per row: its draws do not depend on its batch-mates
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        eos = set() if params.ignore_eos else eos_token_ids(self.model, self.tokenizer)
        result = SequenceResult(prompt_ids=prompt_ids, row=self._ids)
        self.waiting.append(_Row(self._ids, result, params, eos, generator, Detokenizer(self.tokenizer)))
        self._ids += 1
        return result

    def admit(self) -> None:
        """Advance the waiting rows' prompt pass (see the class docstring): all of it when no row
        is decoding, else ``prefill_chunk`` columns; once it is complete they join the batch."""
        if self._prefill is None:
            if not self.waiting or not self.can_join:
                return
            self._prefill = self._start_prefill(self.waiting)
            self.waiting = []
        pf = self._prefill
        cols = pf.width if not self.rows or self.prefill_chunk is None else self.prefill_chunk
        end = min(pf.width, pf.done + cols)
        with pf.pre.attached():
            pf.pre.begin_prefill()
            pf.logits = prefill(self.model, pf.ids[:, pf.done : end], pf.mask[:, :end], pf.pos[:, pf.done : end], pf.cache)
        pf.done = end
        if end < pf.width:
            return
        self._prefill = None
        self.ctl.add_rows([r.result.prompt_ids for r in pf.rows], [r.params.max_new_tokens for r in pf.rows])
        for i, r in enumerate(pf.rows):
            r.result.stats = self.ctl.stats[len(self.rows) + i]
        if self.rows:
            self._join(pf)
        else:
            self._begin(pf)
        if self.fast_path:
            self.cache.padded = any(r.start > 0 for r in self.rows)

    def _start_prefill(self, rows: list[_Row]) -> _Prefill:
        """The rows' prompts as one left-padded batch, with an empty cache and a dense controller."""
        prompts = [r.result.prompt_ids for r in rows]
        S = max(len(p) for p in prompts)
        ids = torch.tensor([[self._pad_id] * (S - len(p)) + p for p in prompts], device=self.device)  # [R, S]
        mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts], device=self.device)  # [R, S]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [R, S] positions count real tokens only
        fresh = not self.rows and self._given_cache is not None
        cache = self._given_cache if fresh else new_cache(self.model)
        self._given_cache = None
        return _Prefill(rows, ids, mask, pos, cache, SkipController(self.model, self.policy, prompts), S)

    def _begin(self, pf: _Prefill) -> None:
        """Prefilled rows start a fresh batch (on the fast path when it supports the model)."""
        S, longest = pf.width, max(r.params.max_new_tokens for r in pf.rows)
        self.cache = pf.cache
        if self.fast is not False:
            why_not = FastDecoder.supports(self.model, S + longest)
            if why_not is None:
                self.cache = FastDecoder(self.model, len(pf.rows), S + longest, padded=False)  # padded set by admit
                self.cache.load_prefill(pf.cache)
            elif self.fast:
                raise GenerationError(f"the fast decode path does not support this model: {why_not}")
        for r in pf.rows:
            r.start = S - len(r.result.prompt_ids)
        self.rows, self.mask, self.positions, self.logits = pf.rows, pf.mask, pf.pos[:, -1:], pf.logits

    def _join(self, pf: _Prefill) -> None:
        """Prefilled rows join the running batch, right-aligned to its current column (a prompt
        longer than the batch so far moves the running rows right)."""
        S, N = pf.width, self.mask.shape[1]
        if self.fast_path:
            extra = max(r.params.max_new_tokens - r.passes for r in self.rows + pf.rows)
            shift = self.cache.join(pf.cache, S, extra)
        else:
            merge_caches(self.cache, pf.cache)
            shift = max(0, S - N)
        width = N + shift
        for r in self.rows:
            r.start += shift
        for r in pf.rows:
            r.start = width - len(r.result.prompt_ids)
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(pf.mask, width, -1)])  # [B + R, N']
        self.positions = torch.cat([self.positions, pf.pos[:, -1:]])
        self.logits = torch.cat([self.logits, pf.logits])
        self.rows = self.rows + pf.rows

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode pass: ``tokens`` [B] (one per row, on the device) -> next logits [B, V]."""
        self.ctl.begin_step([r.passes + 1 for r in self.rows])
        for r in self.rows:
            r.passes += 1
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)  # [B, N + 1]
        self.positions = self.positions + 1  # [B, 1]
        if self.fast_path:
            self.cache.reserve(self.cache.length + 1)
            self.logits = decode_one_token(self.model, tokens[:, None], self.mask, self.positions, self.cache, self.ctl)
        else:
            with self.ctl.attached():
                self.logits = decode_one_token(self.model, tokens[:, None], self.mask, self.positions, self.cache, self.ctl)
        return self.logits

    def _sample(self) -> torch.Tensor:
        """Each row's next token from :attr:`logits` [B, V] with its own sampling -> [B]."""
        if all(r.params.temperature == 0 for r in self.rows):
            return kernels.greedy(self.logits)  # logits.argmax(dim=-1), faster on CPU once a kernel library is loaded
        return torch.cat([sample(self.logits[b : b + 1], r.params, r.generator) for b, r in enumerate(self.rows)])

    def _leave(self, gone: list[int]) -> None:
        """Rows at these batch positions left: drop them from the batch, its cache and state, and
        the leading cache columns no kept row uses any more."""
        keep = [b for b in range(len(self.rows)) if b not in gone]
        self.rows = [self.rows[b] for b in keep]
        self.ctl.keep_rows(keep)
        if not keep:
            self._tokens = None
            return
        idx = upload(keep, self.device)  # [K] (asynchronous)
        self._tokens = self._tokens.index_select(0, idx)
        self.positions = self.positions.index_select(0, idx)
        self.mask = self.mask.index_select(0, idx)
        drop = min(r.start for r in self.rows)  # leading columns no kept row uses
        if self.fast_path:
            self.cache.keep(idx, drop)
        else:
            for layer in self.cache.layers:
                layer.batch_select_indices(idx)
            drop = drop if mergeable(self.cache) else 0
            drop_columns(self.cache, drop)
        self.mask = self.mask[:, drop:]
        for r in self.rows:
            r.start -= drop
        if self.fast_path:
            self.cache.padded = any(r.start > 0 for r in self.rows)

    def step(self) -> list[TokenEvent]:
        """Run the pending decode pass, advance the waiting rows' prompt pass (they join once it is
        complete), then produce one token for every row of the batch.

        Returns one event per row (in batch order); rows that finished have left the batch."""
        if self._tokens is not None and self.rows:
            self.feed(self._tokens)
            self._tokens = None
        self.admit()
        if not self.rows:
            return []
        tokens = self._sample()  # [B]
        cosines = self.ctl.pending_cosines()  # lagged adaptive only: [B', M] on the device, else None
        if cosines is None:
            tokens_host = to_host(tokens)  # HOST SYNC: 1 per step (EOS, stop strings, text)
        else:
            if cosines.shape[0] < tokens.shape[0]:  # rows that joined after the decode pass: none measured
                unmeasured = cosines.new_full((tokens.shape[0] - cosines.shape[0], cosines.shape[1]), float("nan"))
                cosines = torch.cat([cosines, unmeasured])  # [B, M]
            # HOST SYNC: still 1 per step, the tokens and the step's cosines in one transfer
            # (float64 holds every token id exactly).
            packed = to_host(torch.cat([tokens[:, None].double(), cosines.double()], dim=1))  # [B][1 + M]
            tokens_host = [int(row[0]) for row in packed]
            self.ctl.accept_cosines([row[1:] for row in packed])
        self.ctl.end_step([True] * len(self.rows), syncs=1)
        events, gone = [], []
        for b, r in enumerate(self.rows):
            seq, tok = r.result, tokens_host[b]
            is_eos = tok in r.eos
            if not is_eos:
                seq.token_ids.append(tok)
                r.detok.push(tok)
            done = is_eos or seq.stats.generated_tokens >= r.params.max_new_tokens
            if done:
                r.detok.flush()
            delta, hit = _update_text(seq, r.detok.text, r.params.stop, final=done)
            done = done or hit
            cancel = not done and self.cancelled is not None and self.cancelled(r.id)
            if done or cancel:
                if cancel:
                    r.detok.flush()
                    _update_text(seq, r.detok.text, r.params.stop, final=True)
                seq.finish_reason = "cancelled" if cancel else "stop" if (is_eos or hit) else "length"
                gone.append(b)
            events.append(TokenEvent(r.id, tok, delta, done or cancel, seq))
        self._tokens = tokens
        if gone:
            self._leave(gone)
        return events


# ---------------------------------------------------------------------- generate
@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    policy: SkipPolicy | None = None,
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    results: list[SequenceResult] | None = None,
    cache=None,
    fast: bool | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> Iterator[TokenEvent]:
    """Generate for a batch of tokenised prompts, yielding every token as it is produced.

    ``params``: one :class:`SamplingParams` for every row, or a list of one per row (each row
    ends at its own ``max_new_tokens`` and stop strings). ``results`` (optional, filled in
    place) receives one :class:`SequenceResult` per prompt, whose ``text`` and ``stats`` are
    final once the generator is exhausted. ``cache`` (optional) is an empty transformers
    ``Cache`` to fill instead of a new ``DynamicCache``. ``fast``: decode steps on the lean path of
    :mod:`ffnskip.fastpath` (None = whenever it supports the model; then the prompt's K/V move to
    its pre-allocated cache after the prefill). ``cancelled(row)`` (optional) is asked after
    each token of each live row; a row it answers True for ends with
    ``finish_reason="cancelled"`` and computes nothing more (a server stops the generation of a
    client that went away this way). Runs on one :class:`DecodeSession`.
    """
    if not prompt_ids:
        raise GenerationError("every prompt must have at least one token")
    per_row = _per_row(params, len(prompt_ids))
    session = DecodeSession(model, tokenizer, policy, fast=fast, cache=cache, cancelled=cancelled)
    seqs = [session.add(p, q) for p, q in zip(prompt_ids, per_row)]
    if results is not None:
        results.clear()
        results.extend(seqs)
    session.admit()  # every row's prompt pass, as one batch
    while not session.done:
        yield from session.step()


def _per_row(params, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
        raise GenerationError(f"params: one SamplingParams, or a list of {n} (one per prompt)")
    return params


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
