"""The replica's engine loop: continuous batching of many clients' requests on one decode session.

One engine thread per replica runs one :class:`~ffnskip.decode.DecodeSession` at a time. An idle
engine waits up to ``batch_wait_s`` after the oldest request for more, then starts a session with
every waiting request of the same skip policy (up to ``max_batch_size``). While it runs, waiting
requests of the same policy join it at the next step (their prompt pass, then they decode with
the others), and rows leave as soon as they end: EOS, a stop string, their own ``max_tokens``, or
a cancellation (client gone, timeout), after which they compute nothing more. Sampling settings,
lengths and stop strings are per row; skip decisions are per sequence, as the engine makes them.
A request for another policy at the head of the queue stops further joins: the batch drains and
that policy's session is next (no request waits behind an endless stream of joiners). Joins work
on both decode paths (the fast path, and the model's own forward for Gemma 3 and GPT-2). A joining
prompt longer than ``prefill_chunk`` tokens is prefilled that many tokens per step, so the running
rows keep getting one token per step meanwhile (see :class:`~ffnskip.decode.DecodeSession`).

Each row's tokens go to its request's asyncio queue as they are produced. A failure inside a step
is reported to the requests of that session; the loop itself keeps running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

from ffnskip.decode import PREFILL_CHUNK, DecodeSession, SamplingParams, check_prefill_chunk, context_length
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
        self.row: int | None = None  # its row id in the engine's decode session
        self.completion = 0  # tokens sent
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


def _settle(fn: Callable[[], Any], fut: concurrent.futures.Future) -> None:
    """Run a queued call unless it was cancelled: its result, or its exception, to the caller."""
    if fut.set_running_or_notify_cancel():
        try:
            fut.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - the caller gets it; the loop goes on
            fut.set_exception(exc)


class TorchThread:
    """One thread for all of a replica's torch work: loading the model and the engine's decode loop.

    OpenMP keeps a pool of workers for each thread that starts parallel regions. With two such
    threads (the model loaded on one, decoded on another) libgomp manages more threads than the
    machine has CPUs and stops spinning at its barriers, so every parallel region (~120 per step)
    pays a futex wake-up: measured on a 2-core Intel Xeon (AMX), 64 bf16 tokens took 3.1-3.4 s on
    a second thread against 2.2-2.3 s on the loading one, and the server streamed at half the
    offline batch-1 speed. A new thread also starts with OpenMP's default thread count (every
    CPU), not ``torch.set_num_threads``'s: ``threads`` sets it here."""

    def __init__(self, threads: int | None = None, name: str = "ffnskip-engine"):
        self.threads = threads
        self._jobs: deque = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # this thread's OpenMP team size
        while True:
            with self._cond:
                while not self._jobs and not self._stopped:
                    self._cond.wait()
                if not self._jobs:
                    return
                fn, fut = self._jobs.popleft()
            _settle(fn, fut)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopped:
                raise RuntimeError("the torch thread has stopped")
            self._jobs.append((fn, fut))
            self._cond.notify()
        return fut

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on this thread; its result, or its exception raised here."""
        return self.submit(fn).result()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the jobs queued and end the thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)


class BatchEngine:
    """Continuous batching on one thread: requests join the running decode session at its next
    step and leave it as they end. ``submit`` from the event loop."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, batch_wait_s: float = 0.01,
                 max_queued: int = 32, on_batch: Callable[[int], None] | None = None,
                 session_factory: Callable[..., DecodeSession] = DecodeSession,
                 prefill_chunk: int | None = PREFILL_CHUNK, thread: TorchThread | None = None):
        self.model = model
        self.prefill_chunk = check_prefill_chunk(prefill_chunk)
        """Prompt tokens per step of a joining request's prefill while others decode (None: whole)."""
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queued = max_queued
        self.context = context_length(model)
        self._on_batch = on_batch
        self._new_session = session_factory
        self._cond = threading.Condition()
        self._pending: deque[GenRequest] = deque()
        self._live: dict[int, GenRequest] = {}  # row id in the running session -> request
        self._session: DecodeSession | None = None
        self._key: tuple | None = None  # the running session's group key (its policy)
        self._admitting = 0  # taken from the queue, not yet in _live (lock held to change)
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._stop = False
        # The decode loop runs on ``thread`` (the thread that loaded the model: TorchThread says why)
        # or on a thread of its own.
        self._runner = thread
        self._thread = thread.thread if thread is not None else threading.Thread(target=self._run, name="ffnskip-engine", daemon=True)
        self._started = False
        self._done = threading.Event()  # the loop has returned (closed, or failed)
        self.batches = 0
        """Admissions: each time waiting requests joined (or started) the running batch."""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "BatchEngine":
        self._started = True
        if self._runner is not None:
            self._runner.submit(self._run)
        else:
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._done.set()

    def _looping(self) -> bool:
        return self._started and not self._done.is_set()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._looping() and threading.current_thread() is not self._thread:
            self._done.wait(timeout)

    @property
    def alive(self) -> bool:
        return self._looping() and not self._stop

    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._live)

    def _room(self) -> int:
        """(lock held) How many requests may wait: ``max_queued`` plus the batch's free rows;
        requests being admitted (taken from the queue, not yet in ``_live``) count as running."""
        return self.max_queued + max(0, self.max_batch_size - len(self._live) - self._admitting)

    @property
    def full(self) -> bool:
        """A request submitted now would be refused (:class:`Overloaded`)."""
        with self._cond:
            return len(self._pending) >= self._room()

    def check_room(self) -> None:
        """Raise :class:`Overloaded` (the one overload message) when the batch and the queue are full."""
        with self._cond:  # re-entrant: submit calls it with the lock held
            if self.full:
                raise Overloaded(
                    f"the server is overloaded: {len(self._live)} sequences decoding and "
                    f"{len(self._pending)} waiting (queue bound {self.max_queued}); retry later"
                )

    # ------------------------------------------------------------------ submission
    def submit(self, req: GenRequest) -> GenRequest:
        """Queue a request (from a running event loop). Raises :class:`Overloaded` when full."""
        req._bind()
        with self._cond:
            if self._stop or not self._looping():
                raise EngineClosed("the engine is not running")
            self.check_room()
            req.enqueued = time.monotonic()
            self._pending.append(req)
            self._cond.notify_all()
        return req

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the engine thread between two decode steps (e.g. a dense scoring pass:
        the model is never used by two threads at once); its result or exception in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stop or not self._looping():
                raise EngineClosed("the engine is not running")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            _settle(fn, fut)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._live and not self._calls and not self._stop:
                    self._cond.wait()
                if self._stop:
                    break
                if not self._live and self._pending:  # idle: let a batch gather for batch_wait_s
                    deadline = (self._pending[0].enqueued or time.monotonic()) + self.batch_wait_s
                    while not self._stop and len(self._pending) < self.max_batch_size:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self._stop:
                        break
                joiners = self._take_joiners()
            self._run_calls()
            try:
                if joiners:
                    try:
                        self._admit(joiners)
                    finally:
                        with self._cond:
                            self._admitting = 0
                if self._live:
                    self._step()
            except BaseException as exc:  # never let the thread die on a batch
                log.exception("engine step failed")
                for r in list(self._live.values()) + [r for r in joiners if r not in self._live.values()]:
                    r._post(ErrorItem(exc))
                self._live.clear()
                self._session = None
                if not isinstance(exc, Exception):
                    raise
        with self._cond:
            left = list(self._pending) + list(self._live.values())
            self._pending.clear()
            self._live.clear()
            calls = list(self._calls)
            self._calls.clear()
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineClosed("the server is shutting down"))
        for r in left:
            r._post(ErrorItem(EngineClosed("the server is shutting down")))

    def _take_joiners(self) -> list[GenRequest]:
        """Waiting requests that join the running batch now (lock held): the running session's
        policy (any policy when idle), up to ``max_batch_size`` rows. A request for another
        policy at the head of the queue stops further joins, so the batch drains and it is next."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if not self._pending:
            return []
        if self._live:
            if self._session is None or not self._session.can_join or self._pending[0].group_key() != self._key:
                return []
            key, room = self._key, self.max_batch_size - len(self._live)
        else:
            key, room = self._pending[0].group_key(), self.max_batch_size
        taken: list[GenRequest] = []
        keep: deque[GenRequest] = deque()
        for r in self._pending:
            if r.cancelled:
                continue
            if len(taken) < room and r.group_key() == key:
                taken.append(r)
            else:
                keep.append(r)
        self._pending = keep
        self._admitting = len(taken)  # until _admit has put them in _live
        return taken

    def _admit(self, joiners: list[GenRequest]) -> None:
        """Add the joiners to the running session (a new one when idle): their prompt pass starts
        at the session's next step (chunked while rows decode)."""
        if not self._live:
            self._session = self._new_session(self.model, self.tokenizer, joiners[0].entry.policy,
                                              cancelled=lambda row: self._row_cancelled(row),
                                              prefill_chunk=self.prefill_chunk)
            self._key = joiners[0].group_key()
        now = time.monotonic()
        for r in joiners:
            try:
                res = self._session.add(r.prompt_ids, r.params)
            except ValueError as exc:  # e.g. prompt + max_tokens beyond the context: this request only
                with self._cond:
                    self._admitting -= 1
                r._post(ErrorItem(exc))
                continue
            r.started = now
            r.row = res.row
            r.completion = 0
            # Running from now on and no longer being admitted, in one step under the lock: a
            # submit in between would count this request twice and refuse one it has room for
            # (the overload drill's 429s at 7 rows decoding of 16).
            with self._cond:
                self._live[res.row] = r
                self._admitting -= 1
        for r in self._live.values():
            r.batch_size = len(self._live)
        self.batches += 1
        if self._on_batch is not None:
            self._on_batch(len(self._live))

    def _row_cancelled(self, row: int) -> bool:
        r = self._live.get(row)
        return r is None or r.cancelled

    def _step(self) -> None:
        """One step of the running session: every live row's next token to its request."""
        for ev in self._session.step():
            r = self._live.get(ev.row)
            if r is None:
                continue
            if ev.result.finish_reason == "cancelled" or r.cancelled:  # the client left (or timed out)
                if ev.finished:
                    del self._live[ev.row]
                    r._post(ErrorItem(asyncio.CancelledError(r.cancel_reason or "cancelled")))
                continue
            r.completion += 1
            r._post(TokenItem(ev.delta, time.monotonic()))
            if ev.finished:  # EOS, a stop string, its own max_tokens
                del self._live[ev.row]
                r._post(DoneItem("", ev.result.text, ev.result.finish_reason, r.completion,
                                 copy.deepcopy(ev.result.stats)))
        if self._stop:
            raise EngineClosed("the server is shutting down")
        if self._session is not None and self._session.done:
            self._live.clear()
