"""Shared pytest fixtures. Each fixture block is self-contained; append new ones below."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway PostgreSQL 15 cluster for the whole session (tuning store tests).
#
# ``postgresql_server`` runs initdb / pg_ctl from $FFNSKIP_PG_BIN (default
# /usr/lib/postgresql/15/bin) as the ``postgres`` user when the tests run as root (initdb refuses
# root), on a free loopback port in a temporary directory, and stops and removes it at the end.
# It yields the admin URL ``postgresql+psycopg://postgres@127.0.0.1:PORT/postgres``;
# ``postgresql_url`` gives each test a fresh, empty database on it. Missing binaries fail the
# tests with a clear message: CI has PostgreSQL, and the store must be tested on it.
import os as _pg_os
import shutil as _pg_shutil
import socket as _pg_socket
import subprocess as _pg_subprocess
import tempfile as _pg_tempfile
import uuid as _pg_uuid
from pathlib import Path as _PgPath

import pytest

_PG_BIN = _PgPath(_pg_os.environ.get("FFNSKIP_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _pg_free_port() -> int:
    with _pg_socket.socket(_pg_socket.AF_INET, _pg_socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_run(cmd: list[str], as_postgres: bool) -> _pg_subprocess.CompletedProcess:
    if as_postgres:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return _pg_subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def postgresql_server():
    initdb, pg_ctl = _PG_BIN / "initdb", _PG_BIN / "pg_ctl"
    if not (initdb.is_file() and pg_ctl.is_file()):
        pytest.fail(
            f"PostgreSQL 15 server binaries not found in {_PG_BIN} (initdb, pg_ctl): install "
            "postgresql-15 (apt-get install postgresql-15) or set FFNSKIP_PG_BIN to their directory",
            pytrace=False,
        )
    as_postgres = _pg_os.geteuid() == 0
    root = _PgPath(_pg_tempfile.mkdtemp(prefix="ffnskip-pg-"))
    data = root / "data"
    if as_postgres:
        _pg_shutil.chown(root, "postgres", "postgres")
    started = False
    try:
        r = _pg_run([str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                    as_postgres)
        if r.returncode != 0:
            pytest.fail(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}", pytrace=False)
        for _ in range(5):  # a free port can be taken between the probe and the start
            port = _pg_free_port()
            opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
            r = _pg_run([str(pg_ctl), "-D", str(data), "-l", str(root / "server.log"), "-o", opts, "-w", "-t", "60",
                         "start"], as_postgres)
            if r.returncode == 0:
                started = True
                break
        if not started:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else r.stderr
            pytest.fail(f"pg_ctl start failed: {log.strip()[-2000:]}", pytrace=False)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            _pg_run([str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop"], as_postgres)
        _pg_shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgresql_url(postgresql_server):
    """A fresh database on the session's PostgreSQL server, dropped after the test."""
    import psycopg

    name = f"t_{_pg_uuid.uuid4().hex[:16]}"
    admin = postgresql_server.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgresql_server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---------------------------------------------------------------------------------------------
# A PostgreSQL cluster of one test's own, that the test may stop and start again on the same
# port (the reliability drills restart the database under a running study). Same binaries and
# user as ``postgresql_server``; stopped and removed at the end whatever the test did.
class RestartablePostgres:
    def __init__(self, root: _PgPath, as_postgres: bool):
        self.root, self.data, self.as_postgres = root, root / "data", as_postgres
        self.port: int | None = None
        self.url: str | None = None

    def _ctl(self, *args: str) -> _pg_subprocess.CompletedProcess:
        return _pg_run([str(_PG_BIN / "pg_ctl"), "-D", str(self.data), *args], self.as_postgres)

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        r = self._ctl("-l", str(self.root / "server.log"), "-o", opts, "-w", "-t", "60", "start")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        r = self._ctl("-m", mode, "-w", "-t", "60", "stop")
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {r.stderr.strip() or r.stdout.strip()}")

    def running(self) -> bool:
        return self._ctl("status").returncode == 0

    def log_tail(self, n: int = 2000) -> str:
        p = self.root / "server.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""


@pytest.fixture
def restartable_postgresql():
    """A throwaway PostgreSQL 15 cluster (``.url``, ``.stop()``, ``.start()``) for one test."""
    initdb = _PG_BIN / "initdb"
    if not initdb.is_file():
        pytest.fail(f"PostgreSQL 15 server binaries not found in {_PG_BIN}: install postgresql-15 or set "
                    "FFNSKIP_PG_BIN", pytrace=False)
    as_postgres = _pg_os.geteuid() == 0
    root = _PgPath(_pg_tempfile.mkdtemp(prefix="ffnskip-pgr-"))
    if as_postgres:
        _pg_shutil.chown(root, "postgres", "postgres")
    pg = RestartablePostgres(root, as_postgres)
    try:
        r = _pg_run([str(initdb), "-D", str(pg.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                    as_postgres)
        if r.returncode != 0:
            pytest.fail(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}", pytrace=False)
        for _ in range(5):  # a free port can be taken between the probe and the start
            pg.port = _pg_free_port()
            try:
                pg.start()
                break
            except RuntimeError:
                continue
        else:
            pytest.fail(f"pg_ctl start failed: {pg.log_tail()}", pytrace=False)
        pg.url = f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/postgres"
        yield pg
    finally:
        if pg.running():
            pg._ctl("-m", "immediate", "-w", "stop")
        _pg_shutil.rmtree(root, ignore_errors=True)
