"""Processes a test started, tracked by (pid, create_time) so that a recycled pid is never
mistaken for one of ours: what is still alive, and killing it; a free loopback port, and waiting
for a started server. Shared by the tests that start servers and studies (tests/test_serve.py,
test_serve_haproxy.py, test_reliability_serve.py, test_reliability_study.py, test_lm_eval.py)."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Callable, Iterable

import psutil
import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], tail: Callable[[], str],
               seen: set[tuple[int, float]], timeout_s: float = 300.0,
               not_yet: tuple[type[BaseException], ...] = ()) -> None:
    """Poll ``ready()`` once a second until it is true, noting ``proc``'s descendants in ``seen``
    meanwhile; fail the test with ``tail()`` (its log) if ``proc`` exits or ``timeout_s`` passes.
    Exceptions of the types in ``not_yet`` (a connection refused) count as not ready."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen.update(tree(proc.pid, include_root=False))
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{tail()}")
        try:
            if ready():
                break
        except not_yet:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not become ready in {timeout_s:.0f} s:\n{tail()}")
        time.sleep(1)
    seen.update(tree(proc.pid, include_root=False))


def tree(root_pid: int, include_root: bool = True) -> set[tuple[int, float]]:
    """(pid, create_time) of ``root_pid`` and its descendants now (empty once it is gone)."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)] if include_root else root.children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    return note(procs)


def note(procs: Iterable[psutil.Process]) -> set[tuple[int, float]]:
    """(pid, create_time) of ``procs``, skipping any that exited meanwhile."""
    out = set()
    for p in procs:
        try:
            out.add((p.pid, p.create_time()))
        except psutil.NoSuchProcess:
            pass
    return out


def alive(seen: Iterable[tuple[int, float]], zombies: bool = False) -> list[psutil.Process]:
    """The processes of ``seen`` still running (the same process, not a recycled pid); zombies
    count as gone unless ``zombies``."""
    left = []
    for pid, created in seen:
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and (zombies or p.status() != psutil.STATUS_ZOMBIE):
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def describe(p: psutil.Process, width: int = 120) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:width]}"
    except psutil.Error:
        return f"{p.pid} (gone)"


def kill_all(seen: Iterable[tuple[int, float]]) -> list[str]:
    """SIGKILL every process of ``seen`` still alive (zombies included); what was alive (not zombies)."""
    left = []
    for p in alive(seen, zombies=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(describe(p, 100))
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return left
