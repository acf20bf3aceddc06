"""Processes a test started, tracked by (pid, create_time) so that a recycled pid is never
mistaken for one of ours: what is still alive, and killing it. Shared by the tests that start
servers and studies (tests/test_serve.py, test_reliability_serve.py, test_reliability_study.py)."""

from __future__ import annotations

from typing import Iterable

import psutil


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
