"""The replica's engine loop: requests from many clients batched into :func:`ffnskip.generate`.

One engine thread per replica. It takes the oldest waiting request, waits up to ``batch_wait_s``
for more, and runs every compatible waiting request (same skip policy and sampling settings, up to
``max_batch_size``) as one ``generate`` batch; skip decisions stay per sequence (per row), as
the engine makes them. Each row's tokens go to its request's asyncio queue as they are produced.
Requests arriving while a batch runs wait for the next batch (no joining mid-batch: ``generate``
runs a fixed batch from start to end).

Rows may ask for different ``max_tokens``: the batch runs to the largest and a row whose own
limit comes first is ended through ``generate``'s ``cancelled`` callback (it computes nothing
more; its text is completed here). A cancelled row (client gone, timeout) ends the same way at
its next token; a batch whose rows are all finished or cancelled stops.

A failure inside a batch is reported to that batch's requests; the loop itself keeps running.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from ffnskip.decode import SamplingParams, context_length, generate
from ffnskip.engine import SeqStats

from .policies import PolicyEntry

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The replica's queue is full."""


class EngineClosed(RuntimeError):
    """The engine was shut down."""


@dataclass
class TokenItem:
    """One generated token of a request (``delta`` may be empty: text held back)."""

    delta: str
    at: float


@dataclass
class DoneItem:
    """The request's sequence is complete."""

    tail: str
    """Text not yet sent in a TokenItem."""
    text: str
    """The whole generated text."""
    finish_reason: str
    completion_tokens: int
    stats: SeqStats | None


@dataclass
class ErrorItem:
    error: BaseException


Item = TokenItem | DoneItem | ErrorItem


class GenRequest:
    """One sequence to generate; created and consumed on the event loop, fed by the engine thread."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, entry: PolicyEntry):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.entry = entry
        self.created = time.monotonic()
        self.enqueued: float | None = None
        self.started: float | None = None
        self.batch_size: int | None = None
        self.cancelled = False
        self.cancel_reason: str | None = None
        self.finished = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Item] | None = None

    # ------------------------------------------------------------------ consumer side
    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating for this request (safe from any thread, idempotent)."""
        if not self.cancelled and not self.finished:
            self.cancel_reason = reason
        self.cancelled = True

    async def next_item(self) -> Item:
        assert self._queue is not None, "submit the request first"
        item = await self._queue.get()
        if isinstance(item, (DoneItem, ErrorItem)):
            self.finished = True
        return item

    async def items(self) -> AsyncIterator[Item]:
        while True:
            item = await self.next_item()
            yield item
            if isinstance(item, (DoneItem, ErrorItem)):
                return

    # ------------------------------------------------------------------ engine side
    def _bind(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()

    def _post(self, item: Item) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)  # type: ignore[union-attr]
        except RuntimeError:  # the loop closed meanwhile
            pass

    def group_key(self) -> tuple:
        """Requests with equal keys may share a batch."""
        p = self.params
        sampling = (p.temperature, p.top_p, p.top_k) if p.temperature > 0 else (0.0,)
        # A seeded sampling request runs alone: its draws must not depend on its batch-mates.
        seed = id(self) if p.temperature > 0 and p.seed is not None else None
        pol = self.entry.policy
        # skipdecode's schedule depends on max_new_tokens; everything else only on the row.
        mnt = p.max_new_tokens if pol.mode == "skipdecode" else None
        return (json.dumps(pol.to_dict(), sort_keys=True), sampling, p.stop, p.ignore_eos, seed, mnt)


def _final_text(tokenizer, token_ids: list[int], stops: tuple[str, ...]) -> tuple[str, bool]:
    """The complete text of a row ended at its own ``max_tokens`` (nothing held back)."""
    full = tokenizer.decode(token_ids, skip_special_tokens=True)
    cuts = [i for i in (full.find(s) for s in stops) if i >= 0]
    if cuts:
        return full[: min(cuts)], True
    return full, False


class BatchEngine:
    """Runs :class:`GenRequest` batches on one thread. ``submit`` from the event loop."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, batch_wait_s: float = 0.01,
                 max_queued: int = 32, on_batch: Callable[[int], None] | None = None,
                 generate_fn: Callable[..., Any] = generate):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queued = max_queued
        self.context = context_length(model)
        self._on_batch = on_batch
        self._generate = generate_fn
        self._cond = threading.Condition()
        self._pending: deque[GenRequest] = deque()
        self._running: list[GenRequest] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ffnskip-engine", daemon=True)
        self.batches = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "BatchEngine":
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------ submission
    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request (from a running event loop). Raises :class:`Overloaded` when full."""
        req._bind()
        with self._cond:
            if self._stop or not self._thread.is_alive():
                raise EngineClosed("the engine is not running")
            # An idle engine takes a whole batch at once; a busy one holds max_queued more.
            capacity = self.max_queued + (0 if self._running else self.max_batch_size)
            if len(self._pending) >= capacity:
                raise Overloaded(
                    f"the server is overloaded: {len(self._running)} sequences decoding and "
                    f"{len(self._pending)} waiting (queue bound {self.max_queued}); retry later"
                )
            req.enqueued = time.monotonic()
            self._pending.append(req)
            self._cond.notify_all()
        return req

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    break
                head = self._pending[0]
                deadline = (head.enqueued or time.monotonic()) + self.batch_wait_s
                while not self._stop and len(self._pending) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stop:
                    break
                batch = self._take_batch()
                self._running = batch
            try:
                if batch:
                    self._run_batch(batch)
            except BaseException as exc:  # never let the thread die on a batch
                log.exception("engine batch failed")
                for r in batch:
                    r._post(ErrorItem(exc))
            finally:
                with self._cond:
                    self._running = []
        with self._cond:
            left = list(self._pending)
            self._pending.clear()
        for r in left:
            r._post(ErrorItem(EngineClosed("the server is shutting down")))

    def _take_batch(self) -> list[GenRequest]:
        """Pop the oldest live request and the compatible ones after it (lock held)."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if not self._pending:
            return []
        head = self._pending[0]
        key = head.group_key()
        batch: list[GenRequest] = []
        longest = 0
        most = 0
        keep: deque[GenRequest] = deque()
        for r in self._pending:
            if r.cancelled:
                continue
            fits = len(batch) < self.max_batch_size and r.group_key() == key
            if fits and self.context is not None:
                fits = max(longest, len(r.prompt_ids)) + max(most, r.params.max_new_tokens) <= self.context
            if fits:
                batch.append(r)
                longest = max(longest, len(r.prompt_ids))
                most = max(most, r.params.max_new_tokens)
            else:
                keep.append(r)
        self._pending = keep
        return batch

    def _run_batch(self, batch: list[GenRequest]) -> None:
        B = len(batch)
        now = time.monotonic()
        for r in batch:
            r.started = now
            r.batch_size = B
        self.batches += 1
        if self._on_batch is not None:
            self._on_batch(B)
        most = max(r.params.max_new_tokens for r in batch)
        params = dataclasses.replace(batch[0].params, max_new_tokens=most)
        done = [False] * B
        count = [0] * B
        sent = [""] * B
        results: list = []

        def stop_row(i: int) -> bool:
            """Asked by ``generate`` after each token of a live row: end a cancelled row, or a row
            at its own ``max_tokens`` (the batch runs to the largest); the row computes no more."""
            r = batch[i]
            return r.cancelled or results[i].stats.generated_tokens >= r.params.max_new_tokens

        gen = self._generate(self.model, self.tokenizer, [r.prompt_ids for r in batch], batch[0].entry.policy,
                             params, results=results, cancelled=stop_row)
        try:
            for ev in gen:
                i = ev.row
                r = batch[i]
                if done[i]:
                    continue
                if r.cancelled:  # the client left (or timed out): nobody reads this row any more
                    done[i] = True
                else:
                    count[i] += 1
                    reason = ev.result.finish_reason if ev.finished else None
                    if reason is not None and reason != "cancelled":  # EOS, stop string, batch length
                        done[i] = True
                        r._post(TokenItem(ev.delta, time.monotonic()))
                        r._post(DoneItem("", ev.result.text, reason, count[i], copy.deepcopy(ev.result.stats)))
                    elif count[i] >= r.params.max_new_tokens:  # its own limit (ended by stop_row)
                        done[i] = True
                        text, hit = _final_text(self.tokenizer, ev.result.token_ids, r.params.stop)
                        before = sent[i] + ev.delta
                        tail = text[len(before):] if text.startswith(before) else ""
                        r._post(TokenItem(ev.delta, time.monotonic()))
                        r._post(DoneItem(tail, text, "stop" if hit else "length", count[i],
                                         copy.deepcopy(ev.result.stats)))
                    else:
                        sent[i] += ev.delta
                        r._post(TokenItem(ev.delta, time.monotonic()))
                if self._stop:
                    raise EngineClosed("the server is shutting down")
                if all(done[j] or batch[j].cancelled for j in range(B)):
                    break
        except BaseException as exc:
            for j, r in enumerate(batch):
                if not done[j]:
                    done[j] = True
                    r._post(ErrorItem(exc))
            if not isinstance(exc, Exception):
                raise
            if not isinstance(exc, EngineClosed):
                log.warning("batch of %d failed: %s", B, exc)
        finally:
            gen.close()
        for j, r in enumerate(batch):  # cancelled rows: tell a consumer that may still listen
            if not done[j]:
                r._post(ErrorItem(asyncio.CancelledError(r.cancel_reason or "cancelled")))
