"""The replica's engine loop: requests from many clients batched into :func:`ffnskip.generate`.

One engine thread per replica. It takes the oldest waiting request, waits up to ``batch_wait_s``
for more, and runs every compatible waiting request (same skip policy, up to
``max_batch_size``) as one ``generate`` batch on one decode session; skip decisions stay per
sequence (per row), as the engine makes them, and so do sampling settings, ``max_tokens`` and
stop strings (one :class:`SamplingParams` per row: a row ends at its own limit and leaves the
batch). Each row's tokens go to its request's asyncio queue as they are produced. Requests
arriving while a batch runs wait for the next batch (no joining mid-batch yet).

A cancelled row (client gone, timeout) ends through ``generate``'s ``cancelled`` callback at its
next token and computes nothing more; a batch whose rows are all finished or cancelled stops.

A failure inside a batch is reported to that batch's requests; the loop itself keeps running.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from ffnskip.decode import SamplingParams, context_length, generate
from ffnskip.engine import SeqStats
from ffnskip.errors import FFNSkipError

from .policies import PolicyEntry

log = logging.getLogger(__name__)


class Overloaded(FFNSkipError):
    """The replica's queue is full."""


class EngineClosed(FFNSkipError, RuntimeError):
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
        """Requests with equal keys may share a batch: the same skip policy (sampling settings,
        lengths and stop strings are per row; a seeded row draws from its own generator)."""
        return (json.dumps(self.entry.policy.to_dict(), sort_keys=True),)


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
        done = [False] * B
        count = [0] * B

        def stop_row(i: int) -> bool:
            """Asked by ``generate`` after each token of a live row: end a cancelled row."""
            return batch[i].cancelled

        gen = self._generate(self.model, self.tokenizer, [r.prompt_ids for r in batch], batch[0].entry.policy,
                             [r.params for r in batch], cancelled=stop_row)
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
                    r._post(TokenItem(ev.delta, time.monotonic()))
                    if ev.finished:  # EOS, a stop string, its own max_tokens
                        done[i] = True
                        r._post(DoneItem("", ev.result.text, ev.result.finish_reason, count[i],
                                         copy.deepcopy(ev.result.stats)))
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
