"""The FFN-SkipLLM engine: per-sequence, per-token FFN skip decisions (method.md §2).

The engine does not re-implement any layer. While a :class:`SkipController` is attached to a
model it intervenes at three points of every decoder layer, named by the family's adapter:

1. a forward pre-hook on the pre-FFN norm records the residual ``h`` [B, T, D] entering the FFN;
2. the FFN's ``forward`` is wrapped: rows that skip this layer are not computed (the others are
   gathered, run, and scattered back), skipped rows get zeros, so the layer's residual add
   returns ``h`` for them unchanged;
3. a forward hook on the decoder layer reads ``x`` [B, T, D], the residual after the FFN, and for
   rows still holding a skip budget computes ``cos(h, x)``; above the threshold a run of skipped
   FFNs starts at the *next* layer.

Attention is never touched, so every layer writes its K/V for every token. (The whole-layer
baselines ``shortgpt`` and ``skipdecode`` also discard the attention output of a skipped layer;
its K/V is still written, from the un-refined residual.)

Host-device synchronisations (each is counted in the per-sequence stats, and each goes through
:func:`ffnskip.sync.to_host`):
* one per decode step in :mod:`ffnskip.decode` to read the sampled tokens;
* in ``adaptive`` mode one per tested layer (reading the cosines of the batch), only while some
  row of the batch holds a budget;
* in ``adaptive`` mode with ``lagged``: none of its own. The step records the cosines of the
  band's layers on the device; the decode loop reads them with the sampled tokens in its one
  read per step (``pending_cosines`` / ``accept_cosines``), and the next token's skip run is
  chosen from them before its pass begins.

Host-to-device traffic: when rows of a batch skip different layers, the layers need the indices
of the rows that run (and that skip) on the device. They are built on the host from the skip
plan and sent in one asynchronous upload (:func:`ffnskip.sync.upload`) each time the plan
changes (once per step; in eager ``adaptive`` mode also after a test started a run), never one
blocking copy per layer.
"""

from __future__ import annotations

import hashlib
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import Adapter, get_adapter
from .policy import ResolvedPolicy, SkipPolicy
from .sync import to_host, upload

log = logging.getLogger(__name__)


@dataclass
class SeqStats:
    """Skip accounting of one sequence (method.md §3)."""

    num_layers: int
    warmup_tokens: int
    generated_tokens: int = 0
    skipped_ffn: int = 0
    skipped_per_layer: list[int] = field(default_factory=list)
    trigger_layers: list[int] = field(default_factory=list)
    """Histogram: how many skip runs were started by the test after layer ``l``."""
    host_syncs: int = 0

    def __post_init__(self) -> None:
        if not self.skipped_per_layer:
            self.skipped_per_layer = [0] * self.num_layers
        if not self.trigger_layers:
            self.trigger_layers = [0] * self.num_layers

    @property
    def skip_ratio(self) -> float:
        """Skipped FFNs / (layers x generated tokens), every generated token counted."""
        denom = self.num_layers * self.generated_tokens
        return self.skipped_ffn / denom if denom else 0.0

    @property
    def skip_ratio_post_warmup(self) -> float:
        """Skipped FFNs / (layers x generated tokens past the warm-up)."""
        denom = self.num_layers * max(0, self.generated_tokens - self.warmup_tokens)
        return self.skipped_ffn / denom if denom else 0.0

    @property
    def syncs_per_token(self) -> float:
        return self.host_syncs / self.generated_tokens if self.generated_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "generated_tokens": self.generated_tokens,
            "skipped_ffn": self.skipped_ffn,
            "skip_ratio": self.skip_ratio,
            "skip_ratio_post_warmup": self.skip_ratio_post_warmup,
            "skipped_per_layer": list(self.skipped_per_layer),
            "trigger_layers": list(self.trigger_layers),
            "host_syncs": self.host_syncs,
            "syncs_per_token": self.syncs_per_token,
        }

    @staticmethod
    def merge(stats: Sequence["SeqStats"]) -> "SeqStats":
        """Pool several sequences' counts (ratios of the pool, not means of ratios)."""
        if not stats:
            return SeqStats(num_layers=0, warmup_tokens=0)
        out = SeqStats(num_layers=stats[0].num_layers, warmup_tokens=0)
        post = 0
        for s in stats:
            out.generated_tokens += s.generated_tokens
            out.skipped_ffn += s.skipped_ffn
            out.host_syncs += s.host_syncs
            post += max(0, s.generated_tokens - s.warmup_tokens)
            for i, v in enumerate(s.skipped_per_layer):
                out.skipped_per_layer[i] += v
            for i, v in enumerate(s.trigger_layers):
                out.trigger_layers[i] += v
        # Keep skip_ratio_post_warmup exact for the pool: warm-up = pooled warm-up tokens.
        out.warmup_tokens = out.generated_tokens - post
        return out


@dataclass(frozen=True)
class RowSplit:
    """Which rows of the batch skip one layer, and the device indices to split the batch by.

    ``keep`` / ``skip`` ([K] / [S] int64 on the model's device) are set only when the batch is
    split (some rows skip, some do not); they are views of one upload per skip plan."""

    skipping: tuple[int, ...] = ()
    keep: torch.Tensor | None = None  # [K] rows that run the FFN (or layer)
    skip: torch.Tensor | None = None  # [S] rows that skip it

    @property
    def none(self) -> bool:
        """No row skips."""
        return not self.skipping

    @property
    def all(self) -> bool:
        """Every row skips."""
        return bool(self.skipping) and self.keep is None


_NO_SPLIT = RowSplit()


def ffn_rows(split: RowSplit, x: torch.Tensor, ffn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The skip applied (both decode paths): ``ffn`` runs on the rows of ``x`` [B, T, D] that do
    not skip it, gathered into [K, T, D]; the rows that skip get zeros, so a residual add leaves
    them unchanged."""
    if split.none:
        return ffn(x)
    if split.keep is None:
        return torch.zeros_like(x)  # [B, T, D]: nobody runs it
    out = torch.zeros_like(x)  # [B, T, D]
    return out.index_copy_(0, split.keep, ffn(x.index_select(0, split.keep)))


def skip_whole_layer(split: RowSplit, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Whole-layer baselines (both decode paths): the rows that skip the layer get its input
    ``x_in`` back instead of its output ``x_out`` [B, T, D]."""
    if split.none:
        return x_out
    if split.keep is None:
        return x_in
    return x_out.index_copy(0, split.skip, x_in.index_select(0, split.skip))


def sequence_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """Per-sequence seed of the ``random`` baseline: same prompt + seed -> same choices,
    whatever else is in the batch."""
    digest = hashlib.sha256(f"{seed}:".encode() + bytes(str(list(prompt_ids)), "ascii")).digest()
    return int.from_bytes(digest[:8], "little")


def ffn_share(model: nn.Module) -> float:
    """Share of the per-token matmul weights that sit in FFNs (LM head included, method.md §3)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    ffn = sum(adapter.ffn_weight_count(layer) for layer in layers)
    total = sum(p.numel() for layer in layers for p in layer.parameters() if p.dim() == 2)
    head = model.get_output_embeddings()
    if head is not None:
        total += head.weight.numel()
    return ffn / total if total else 0.0


class SkipController:
    """Skip decisions for one batch of sequences during one generation.

    Call :meth:`begin_step` before every forward pass that produces generated token ``t`` of each
    row, inside :meth:`attached`. Rows are independent: every decision is per sequence.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: SkipPolicy,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int] = 0,
    ) -> None:
        self.model = model
        self.policy = policy
        self.adapter: Adapter = get_adapter(model)
        self.layers = self.adapter.layers(model)
        self.num_layers = len(self.layers)
        self.resolved: ResolvedPolicy = policy.resolve(self.num_layers)
        # Per-row state (host lists; B is small and decisions are per row). Rows join with
        # add_rows and leave with keep_rows (a running batch of the decode session).
        self.stats: list[SeqStats] = []
        self._rngs: list[random.Random] = []
        self.finished: list[bool] = []
        self._max_new: list[int] = []
        self._skip: list[list[bool]] = []
        self._budget: list[int] = []
        self._cos_prev: list[list[float] | None] = []
        # Whole-layer baselines (shortgpt, skipdecode): the layer's output is replaced by its input.
        self._whole = policy.mode in ("shortgpt", "skipdecode")
        self._any_skip = False
        self._testing = False
        self._h: torch.Tensor | None = None
        self._prefill = True
        self._step_syncs = 0
        # adaptive + lagged: this step's cosines per tested layer (device tensors [B]) and, per
        # row, the previous step's as host floats (nan where the layer's FFN did not run).
        # (a threshold above 1 never fires: nothing to record)
        self._lagged = policy.mode == "adaptive" and policy.lagged and policy.threshold <= 1.0 + 1e-6
        self._recording = False
        self._cos_dev: dict[int, torch.Tensor] = {}
        # The skip plan as device row indices per layer (see row_split); None = to be rebuilt.
        self.device = next(model.parameters()).device
        self._splits: list[RowSplit] | None = None
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * len(prompt_ids)
        self.add_rows(prompt_ids, max_new_tokens)

    @property
    def batch_size(self) -> int:
        return len(self.stats)

    @property
    def max_new_tokens(self) -> list[int]:
        """Each row's generation length (position-based schedules depend on it)."""
        return list(self._max_new)

    def add_rows(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int]) -> None:
        """Rows join the batch (after the existing ones), each before its prompt pass."""
        if len(max_new_tokens) != len(prompt_ids):
            raise ValueError("one max_new_tokens per prompt")
        for ids, n in zip(prompt_ids, max_new_tokens):
            self.stats.append(SeqStats(self.num_layers, self.policy.warmup_tokens))
            self._rngs.append(random.Random(sequence_seed(self.policy.seed, ids)))
            self.finished.append(False)
            self._max_new.append(int(n))
            # the prompt pass's plan (what its token 0 is accounted with): dense, or shortgpt's removal
            self._skip.append([self.resolved.mode == "shortgpt" and i in self.resolved.removed for i in range(self.num_layers)])
            self._budget.append(0)
            self._cos_prev.append(None)
        self._any_skip = self._any_skip or (self.resolved.mode == "shortgpt" and bool(self.resolved.removed) and bool(prompt_ids))
        self._splits = None

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Only ``rows`` stay in the batch, in this order (the others left: finished, cancelled)."""
        for name in ("stats", "_rngs", "finished", "_max_new", "_skip", "_budget", "_cos_prev"):
            values = getattr(self, name)
            setattr(self, name, [values[r] for r in rows])
        self._any_skip = any(any(s) for s in self._skip)
        self._splits = None

    # ------------------------------------------------------------------ schedule
    def begin_prefill(self) -> None:
        """The prompt pass of every row: every layer dense, no tests (it produces token 0).

        Only ``shortgpt`` differs: its layers are removed from the model, the prompt included.
        """
        self._prefill = True
        self._testing = False
        self._recording = False
        self._any_skip = False
        for r in range(self.batch_size):
            skip = self._skip[r]
            for i in range(self.num_layers):
                skip[i] = self.resolved.mode == "shortgpt" and i in self.resolved.removed
        self._any_skip = self.resolved.mode == "shortgpt" and bool(self.resolved.removed)
        self._step_syncs = 0
        self._splits = None

    def begin_step(self, token_index: Sequence[int]) -> None:
        """Before the pass that produces generated token ``token_index[r]`` of each row ``r``."""
        self._prefill = False
        res = self.resolved
        mode = res.mode
        any_skip = False
        testing = False
        for r in range(self.batch_size):
            skip = self._skip[r]
            if self.finished[r]:
                # A finished row's outputs are discarded: compute none of its FFNs.
                for i in range(self.num_layers):
                    skip[i] = True
                self._budget[r] = 0
                any_skip = True
                continue
            for i in range(self.num_layers):
                skip[i] = False
            k = res.token_budget(token_index[r])
            self._budget[r] = 0
            if k == 0:
                continue
            if mode == "adaptive":
                if res.policy.threshold > 1.0 + 1e-6:
                    continue  # cos <= 1 (up to rounding): the test can never fire, so don't run it
                if self._lagged:
                    any_skip |= self._start_lagged_run(r, k)
                    continue
                self._budget[r] = k
                testing = True
            elif mode == "static":
                for i in range(res.start, res.start + k):
                    skip[i] = True
                any_skip = True
            elif mode == "random":
                for i in self._rngs[r].sample(range(res.start, res.end), k):
                    skip[i] = True
                any_skip = True
            elif mode == "shortgpt":
                for i in res.removed:
                    skip[i] = True
                any_skip = True
            elif mode == "skipdecode":
                for i in res.skipdecode_layers(token_index[r], self._max_new[r]):
                    skip[i] = True
                    any_skip = True
        self._any_skip = any_skip
        self._testing = testing
        self._step_syncs = 0
        self._splits = None
        self._cos_dev = {}
        # lagged: every step records its cosines (the warm-up's too: they seed the first run)
        self._recording = self._lagged and not all(self.finished)

    def _start_run(self, r: int, after: int, k: int) -> None:
        """Row ``r``'s run of at most ``k`` skipped FFNs, starting after the test at layer
        ``after``; a run never enters the cold end (layers >= the band's end)."""
        skip = self._skip[r]
        for i in self.resolved.run_after(after, k):
            skip[i] = True
        self.stats[r].trigger_layers[after] += 1
        self._splits = None

    def _start_lagged_run(self, r: int, k: int) -> bool:
        """lagged: row ``r``'s run of ``k`` skips starts after the first tested layer whose cosine
        was above the threshold in the previous step (none measured yet: no run)."""
        prev = self._cos_prev[r]
        if prev is None:
            return False
        res = self.resolved
        tau = res.policy.threshold
        for j in res.test_layers:  # tests after layer j start runs at j + 1
            if prev[j] > tau:  # nan (not measured) never fires
                self._start_run(r, j, k)
                return True
        return False

    def pending_cosines(self) -> torch.Tensor | None:
        """lagged: this step's recorded cosines, [B, M] on the device (M tested layers), for the
        decode loop to read together with the sampled tokens; None when nothing was recorded."""
        if not self._cos_dev:
            return None
        return torch.stack([self._cos_dev[j] for j in sorted(self._cos_dev)], dim=1)  # [B, M]

    def accept_cosines(self, rows: Sequence[Sequence[float]]) -> None:
        """lagged: the host copy of :meth:`pending_cosines` ([B][M] floats), kept per row for the
        next step's decision. A layer whose FFN a row skipped in this step reads as nan."""
        layers = sorted(self._cos_dev)
        nan = float("nan")
        for r, values in enumerate(rows):
            prev = [nan] * self.num_layers
            skip = self._skip[r]
            for j, c in zip(layers, values):
                if not skip[j]:
                    prev[j] = float(c)
            self._cos_prev[r] = prev
        self._cos_dev = {}

    def collect_cosines(self) -> None:
        """lagged, outside the decode loop (teacher forcing): read this step's cosines on their
        own (one host synchronisation, counted)."""
        pending = self.pending_cosines()
        if pending is not None:
            self.accept_cosines(to_host(pending))  # HOST SYNC (1 per step, lagged only)
            self._step_syncs += 1

    def end_step(self, produced: Sequence[bool], syncs: int = 0) -> None:
        """After a pass: count the step for rows that produced a token (``produced[r]``)."""
        total_syncs = self._step_syncs + syncs
        for r in range(self.batch_size):
            if not produced[r]:
                continue
            st = self.stats[r]
            st.generated_tokens += 1
            st.host_syncs += total_syncs
            skip = self._skip[r]
            for i in range(self.num_layers):
                if skip[i]:
                    st.skipped_ffn += 1
                    st.skipped_per_layer[i] += 1

    def finish(self, row: int) -> None:
        """Row ``row`` produced its last token (or was cancelled): from the next step on it
        computes no FFN (:meth:`begin_step` marks every layer skipped for it)."""
        self.finished[row] = True

    # ------------------------------------------------------------------ per-layer decisions
    # Shared by the hooks below (model's own forward) and ffnskip.fastpath (lean decode step).
    @property
    def testing(self) -> bool:
        """Some row still holds a skip budget in this pass (the adaptive test must run), or the
        lagged rule records this pass's cosines: the paths call :meth:`observe` after each layer."""
        return self._testing or self._recording

    @property
    def whole_layer(self) -> bool:
        """Whole-layer baselines (``shortgpt``, ``skipdecode``): a skipped row's layer output is
        replaced by its input (attention output discarded too), not only its FFN's."""
        return self._whole

    def row_split(self, layer: int) -> RowSplit:
        """The rows skipping ``layer`` and, when the batch is split there, the device indices of
        the rows that run and that skip it. Host work only: the indices of every split layer
        were sent in one asynchronous upload when the plan last changed."""
        if not self._any_skip:
            return _NO_SPLIT
        if self._splits is None:
            self._splits = self._plan_splits()
        return self._splits[layer]

    def _plan_splits(self) -> list[RowSplit]:
        B = self.batch_size
        rows = range(B)
        per_layer: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        flat: list[int] = []
        for i in range(self.num_layers):
            skipping = tuple(r for r in rows if self._skip[r][i])
            keep = tuple(r for r in rows if not self._skip[r][i]) if 0 < len(skipping) < B else ()
            per_layer.append((skipping, keep))
            if keep:
                flat.extend(keep)
                flat.extend(skipping)
        dev = upload(flat, self.device) if flat else None  # [sum K + S], one non-blocking copy
        out: list[RowSplit] = []
        at = 0
        for skipping, keep in per_layer:
            if not skipping:
                out.append(_NO_SPLIT)
            elif not keep:
                out.append(RowSplit(skipping))
            else:
                k, n = len(keep), len(keep) + len(skipping)
                out.append(RowSplit(skipping, dev[at : at + k], dev[at + k : at + n]))
                at += n
        return out

    def observe(self, layer: int, h: torch.Tensor, x: torch.Tensor) -> None:
        """The adaptive test after ``layer``: h, x [B, T, D] = residual before / after its FFN."""
        res = self.resolved
        if layer not in res.test_layers:
            return
        if self._recording:  # lagged: record on the device, decide at the next step
            cos = F.cosine_similarity(h[:, -1].float(), x[:, -1].float(), dim=-1)  # [B]
            self._cos_dev[layer] = cos
            return
        if not self._testing:
            return
        rows = [r for r in range(self.batch_size) if self._budget[r] > 0]
        if not rows:
            self._testing = False
            return
        # Every row's cosine (a few hundred flops each): no row index to upload for a subset.
        cos = F.cosine_similarity(h[:, -1].float(), x[:, -1].float(), dim=-1)  # [B] over the hidden dim
        values = to_host(cos)  # HOST SYNC (1 per tested layer while a row holds a budget)
        self._step_syncs += 1
        tau = res.policy.threshold
        for r in rows:
            if values[r] > tau:
                self._start_run(r, layer, self._budget[r])
                self._budget[r] = 0  # one run per token
                self._any_skip = True
        if not any(b > 0 for b in self._budget):
            self._testing = False

    # ------------------------------------------------------------------ hooks
    def _make_ffn_forward(self, layer: int, orig):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            # x: [B, T, D] normed residual entering the FFN
            return ffn_rows(self.row_split(layer), x, lambda rows: orig(rows, *args, **kwargs))

        return forward

    def _pre_ffn_norm_hook(self, module, args):
        if self.testing:
            self._h = args[0]  # [B, T, D] residual before the FFN

    def _make_layer_hook(self, layer: int):
        def hook(module, args, output):
            if self.testing:
                self.observe(layer, self._h, output[0] if isinstance(output, tuple) else output)
            return None

        return hook

    def _make_whole_layer_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            split = self.row_split(layer)
            if split.none:
                return None
            x_in = args[0] if args else kwargs["hidden_states"]  # [B, T, D] layer input
            x = skip_whole_layer(split, x_in, output[0] if isinstance(output, tuple) else output)  # [B, T, D]
            return (x, *output[1:]) if isinstance(output, tuple) else x

        return hook

    @contextmanager
    def attached(self) -> Iterator["SkipController"]:
        """Install the hooks on the model for the duration of the block. Every mode wraps the
        FFNs (in ``dense`` mode only finished or cancelled rows skip them: they compute nothing);
        the adaptive test and the whole-layer baselines add their hooks."""
        handles = []
        patched: list[tuple[nn.Module, Any]] = []
        try:
            for i, layer in enumerate(self.layers):
                ffn = self.adapter.ffn_module(layer)
                prev = ffn.__dict__.get("forward")
                ffn.forward = self._make_ffn_forward(i, ffn.forward)
                patched.append((ffn, prev))
                if self._whole:
                    handles.append(layer.register_forward_hook(self._make_whole_layer_hook(i), with_kwargs=True))
                if self.resolved.mode == "adaptive":
                    norm = self.adapter.ffn_norm_module(layer)
                    handles.append(norm.register_forward_pre_hook(self._pre_ffn_norm_hook))
                    handles.append(layer.register_forward_hook(self._make_layer_hook(i)))
            yield self
        finally:
            for h in handles:
                h.remove()
            for ffn, prev in patched:
                if prev is None:
                    del ffn.forward
                else:
                    ffn.forward = prev
            self._h = None
