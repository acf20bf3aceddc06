"""Reliability drills of a tuning study (issue 16): the driver killed with SIGKILL then resumed,
and the database restarted under a running study. Each drill prints one ``RELIABILITY {json}``
line (``pytest -s``) and appends it to ``$FFNSKIP_RELIABILITY_OUT`` (default
``$TMPDIR/ffnskip-reliability.jsonl``): the README's Reliability table is filled from them.

Every study runs as ``python -m tuning`` in a process session of its own, with an embedded Ray
(``address="local"``, its own temp dir): the drill kills that session by id, never ``ray stop``
(other Ray clusters on the machine are not touched), and asserts that no process the study
started outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import proctrack  # noqa: E402
from test_multinode import make_working_dir, session_pids  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the drills signal Linux process sessions")

#: A trial's evaluation sleeps this long first, so that trials are seen running.
SLOW_S = 2.0
SLOW_EVAL = f"""\
import os
import time

from ffnskip.eval import evaluate as ffnskip_evaluate


def evaluate(model, tokenizer, policy, task, **kwargs):
    if policy.mode != "dense":  # the trials, not the dense baseline
        marks = os.environ.get("FFNSKIP_DRILL_MARKS")
        if marks:  # the drill sees which process evaluates now
            open(os.path.join(marks, str(os.getpid())), "w").close()
        time.sleep(float(os.environ.get("FFNSKIP_DRILL_SLOW_S", {SLOW_S})))
    return ffnskip_evaluate(model, tokenizer, policy, task, **kwargs)
"""


def study_yaml(wd: Path, name: str, trials: int) -> Path:
    text = f"""\
study: {name}
model: {wd / 'tiny-model'}
task: factoid_qa
data_file: {wd / 'questions.jsonl'}
limit: 2
max_new_tokens: 4
seed: 0
trials: {trials}
concurrency: 2
resources: {{cpu: 1, gpu: 0}}
objectives: [quality, skip_ratio]
max_quality_drop: null
progress: false
warm_start: false
evaluator: slow_eval:evaluate
"""
    path = wd / f"{name}.yaml"
    path.write_text(text)
    return path


def report(drill: str, **figures) -> None:
    """One drill's figures: printed (``pytest -s``) and appended to the JSON-lines file."""
    line = json.dumps({"drill": drill, **figures}, sort_keys=True)
    print(f"\nRELIABILITY {line}")
    out = os.environ.get("FFNSKIP_RELIABILITY_OUT") or os.path.join(tempfile.gettempdir(),
                                                                     "ffnskip-reliability.jsonl")
    with open(out, "a") as f:
        f.write(line + "\n")


# ------------------------------------------------------------------------------ processes
class Driver:
    """``python -m tuning`` in a session of its own; remembers every process it started."""

    def __init__(self, args: list[str], wd: Path, env: dict[str, str], log: Path):
        self.log = log
        self._out = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tuning", *args], cwd=wd, env=env, stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.sid = self.proc.pid
        self.seen: set[tuple[int, float]] = set()
        self.started = time.monotonic()

    def track(self) -> None:
        """Note the processes of its tree and of its session (Ray's raylet, GCS, workers ...)."""
        procs = []
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        for pid in session_pids(self.sid):
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        self.seen |= proctrack.note(procs)

    def survivors(self) -> list[str]:
        """Processes it started that are still alive (zombies count as gone)."""
        left = [proctrack.describe(p) for p in proctrack.alive(self.seen)]
        left += [f"{pid} (session {self.sid})" for pid in session_pids(self.sid)
                 if _alive(pid) and not any(s.startswith(f"{pid} ") for s in left)]
        return left

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.track()
            if time.monotonic() > deadline:
                raise AssertionError(f"the study did not finish in {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.3)
        return self.proc.returncode

    def kill_session(self) -> None:
        """SIGKILL to its whole process session (the driver and everything it started)."""
        self.track()
        for pid in [self.sid, *session_pids(self.sid)]:
            try:
                os.killpg(pid, signal.SIGKILL) if pid == self.sid else os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(timeout=30)

    def reap(self, timeout: float = 30.0) -> list[str]:
        """Wait for what it started to exit; SIGKILL what is left after ``timeout``. Returns
        the processes that were still alive at the deadline."""
        deadline = time.monotonic() + timeout
        left = self.survivors()
        while left and time.monotonic() < deadline:
            time.sleep(0.3)
            left = self.survivors()
        proctrack.kill_all(self.seen)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        return left

    def tail(self, n: int = 6000) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-n:]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def drill_dir():
    # Short: Ray's Unix socket paths live under its temp dir (at most 107 characters).
    d = Path(tempfile.mkdtemp(prefix="ffrl-", dir="/tmp"))
    (d / "wd").mkdir()
    make_working_dir(d / "wd")
    (d / "wd" / "slow_eval.py").write_text(SLOW_EVAL)
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def driver_env(d: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    (d / "home").mkdir(exist_ok=True)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(d / "ray"), HOME=str(d / "home"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", FFNSKIP_DENSE_CACHE="off",
               PYTHONPATH=os.pathsep.join([str(d / "wd"), str(ROOT)]), PYTHONUNBUFFERED="1")
    return env


def query(url: str, sql: str, **params) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params).all()]
    finally:
        engine.dispose()


def trial_counts(url: str, study: str) -> dict[str, int]:
    try:
        rows = query(url, "SELECT t.status, count(*) FROM ffnskip_trials t JOIN ffnskip_studies s "
                          "ON s.id = t.study_id WHERE s.name = :n GROUP BY t.status", n=study)
    except sa.exc.DBAPIError:  # the tables are not there yet (or the database is down)
        return {}
    return dict(rows)


def running_ids(url: str, study: str) -> set[int]:
    try:
        rows = query(url, "SELECT t.id FROM ffnskip_trials t JOIN ffnskip_studies s ON s.id = t.study_id "
                          "WHERE s.name = :n AND t.status = 'running'", n=study)
    except sa.exc.DBAPIError:  # the tables are not there yet
        return set()
    return {r[0] for r in rows}


def optuna_states(url: str, study: str) -> dict[str, int]:
    rows = query(url, "SELECT t.state, count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                      "WHERE s.study_name = :n GROUP BY t.state", n=study)
    return {str(state).split(".")[-1]: n for state, n in rows}


def duplicate_numbers(url: str, study: str) -> dict[str, int]:
    """Trial numbers used twice: in our table (optuna_number) and in Optuna's."""
    ours = query(url, "SELECT t.optuna_number FROM ffnskip_trials t JOIN ffnskip_studies s ON s.id = t.study_id "
                      "WHERE s.name = :n AND t.optuna_number IS NOT NULL GROUP BY t.optuna_number "
                      "HAVING count(*) > 1", n=study)
    theirs = query(url, "SELECT t.number FROM trials t JOIN studies s ON s.study_id = t.study_id "
                        "WHERE s.study_name = :n GROUP BY t.number HAVING count(*) > 1", n=study)
    return {"ffnskip": len(ours), "optuna": len(theirs)}


# ------------------------------------------------------------------------------ drill 1
def test_sigkill_of_the_driver_then_resume_loses_and_duplicates_nothing(drill_dir):
    wd, env = drill_dir / "wd", driver_env(drill_dir)
    url = f"sqlite:///{drill_dir / 'study.db'}"
    config = study_yaml(wd, "sigkill", trials=5)
    args = ["--config", str(config), "--db", url]
    drivers: list[Driver] = []
    try:
        first = Driver(args, wd, env, drill_dir / "first.log")
        drivers.append(first)
        deadline = time.monotonic() + 180
        seen_running: set[int] = set()
        while True:  # at least one finished trial and a trial that has just started
            first.track()
            counts = trial_counts(url, "sigkill")
            running = running_ids(url, "sigkill")
            # A trial first seen running at this poll has its SLOW_S sleep ahead of it, so it is still
            # running when the kill lands; one seen before may finish between this poll and the kill.
            if counts.get("completed", 0) >= 1 and running - seen_running:
                break
            seen_running |= running
            assert first.proc.poll() is None, f"the study ended before the kill:\n{first.tail()}"
            assert time.monotonic() < deadline, f"no finished + running trial in 180 s: {counts}\n{first.tail()}"
            time.sleep(0.1)
        first.kill_session()
        left = first.reap(timeout=20)
        assert not left, f"processes outlived the SIGKILL of the driver's session: {left}"
        # What the kill left, read after it (a trial can start or finish between the poll and the kill).
        at_kill = trial_counts(url, "sigkill")
        assert at_kill.get("completed", 0) >= 1 and at_kill.get("running", 0) >= 1, at_kill
        completed_before = {r[0] for r in query(
            url, "SELECT t.id FROM ffnskip_trials t WHERE t.status = 'completed'")}
        assert optuna_states(url, "sigkill").get("RUNNING", 0) >= 1  # what the kill left behind

        started = time.monotonic()
        second = Driver([*args, "--resume"], wd, env, drill_dir / "second.log")
        drivers.append(second)
        rc = second.wait(timeout=240)
        resume_s = time.monotonic() - started
        out = second.tail()
        assert rc == 0, f"--resume failed ({rc}):\n{out}"
        left = second.reap(timeout=20)
        assert not left, f"processes outlived the resumed study: {left}"
    finally:
        for d in drivers:
            if d.proc.poll() is None:
                d.kill_session()
            d.reap(timeout=10)

    counts = trial_counts(url, "sigkill")
    states = optuna_states(url, "sigkill")
    dups = duplicate_numbers(url, "sigkill")
    assert counts.get("completed") == 5 and counts.get("running", 0) == 0, counts
    assert states.get("COMPLETE") == 5 and states.get("RUNNING", 0) == 0 and states.get("WAITING", 0) == 0, states
    assert dups == {"ffnskip": 0, "optuna": 0}
    completed_after = {r[0] for r in query(url, "SELECT t.id FROM ffnskip_trials t WHERE t.status = 'completed'")}
    assert completed_before <= completed_after  # no finished trial lost
    interrupted = query(url, "SELECT error FROM ffnskip_trials WHERE status = 'failed'")
    assert len(interrupted) == at_kill["running"] and all("interrupted" in e for (e,) in interrupted)
    assert f"marked {at_kill['running']} interrupted trial(s)" in out
    # Our rows and Optuna's agree on which trial is which.
    ours = sorted(r[0] for r in query(url, "SELECT optuna_number FROM ffnskip_trials WHERE status = 'completed'"))
    theirs = sorted(r[0] for r in query(url, "SELECT number FROM trials WHERE state = 'COMPLETE'"))
    assert ours == theirs
    report("driver SIGKILL + --resume", trials=5, completed_at_kill=at_kill.get("completed", 0),
           running_at_kill=at_kill.get("running", 0), completed=counts["completed"],
           lost=len(completed_before - completed_after), duplicated=dups["ffnskip"] + dups["optuna"],
           running_after=counts.get("running", 0) + states.get("RUNNING", 0),
           interrupted_marked_failed=len(interrupted), resume_s=round(resume_s, 1), processes_left=0,
           optuna_told_on_resume=int(out.split("told Optuna ")[1].split()[0]) if "told Optuna " in out else 0)


# ------------------------------------------------------------------------------ drill 3
#: How long the database stays down under the running study.
DOWN_S = 4.0


def test_database_restart_mid_study_is_survived_and_loses_nothing(drill_dir, restartable_postgresql):
    pg = restartable_postgresql
    wd, env = drill_dir / "wd", driver_env(drill_dir)
    config = study_yaml(wd, "pgrestart", trials=4)
    driver = Driver(["--config", str(config), "--db", pg.url], wd, env, drill_dir / "pg.log")
    try:
        deadline = time.monotonic() + 180
        while True:  # mid-study: a finished trial, others to come
            driver.track()
            counts = trial_counts(pg.url, "pgrestart")
            if counts.get("completed", 0) >= 1:
                break
            assert driver.proc.poll() is None, f"the study ended before the restart:\n{driver.tail()}"
            assert time.monotonic() < deadline, f"no finished trial in 180 s: {counts}\n{driver.tail()}"
            time.sleep(0.1)
        at_stop = counts
        pg.stop("fast")  # every connection of the study is cut
        down_at = time.monotonic()
        while time.monotonic() - down_at < DOWN_S:
            driver.track()
            time.sleep(0.2)
        pg.start()  # same data, same port
        downtime_s = time.monotonic() - down_at
        rc = driver.wait(timeout=240)
        out = driver.tail(200_000)
        assert rc == 0, f"the study did not survive the database restart ({rc}):\n{out[-6000:]}"
    finally:
        if driver.proc.poll() is None:
            driver.kill_session()
        left = driver.reap(timeout=20)
    assert not left, f"processes outlived the study: {left}"

    counts = trial_counts(pg.url, "pgrestart")
    states = optuna_states(pg.url, "pgrestart")
    assert counts == {"completed": 4}, counts  # nothing lost, nothing failed, nothing left running
    assert states == {"COMPLETE": 4}, states
    assert duplicate_numbers(pg.url, "pgrestart") == {"ffnskip": 0, "optuna": 0}
    samples = query(pg.url, "SELECT count(*) FROM ffnskip_samples")[0][0]
    assert samples == 4 * 2  # every trial's per-sample rows (2 questions)
    lines = out.splitlines()
    retries = [ln for ln in lines if ": retry " in ln and " after " in ln]
    store_retries = [ln for ln in retries if "store " in ln.split(": retry")[0]]
    optuna_retries = [ln for ln in retries if "optuna storage" in ln]
    back = [ln for ln in lines if "the database is back after" in ln]
    assert retries and back, f"no write met the outage (it should have):\n{out[-6000:]}"
    assert "Traceback" not in out, out[-6000:]
    waited = max(float(ln.split("back after ")[1].split(" s")[0]) for ln in back)
    report("PostgreSQL restart mid-study", trials=4, completed_at_stop=at_stop.get("completed", 0),
           downtime_s=round(downtime_s, 1), longest_wait_s=waited, retries=len(retries),
           store_retries=len(store_retries), optuna_retries=len(optuna_retries), outages_survived=len(back),
           completed=counts.get("completed", 0), lost=0, crashed=False)


def test_store_writes_wait_for_a_restarted_database_with_backoff(restartable_postgresql, caplog):
    """The store's own session scope: a write issued while PostgreSQL is down is retried with
    exponential backoff until it is back, logged, and lands once; past the outage window it
    fails with the database's error instead of hanging."""
    import threading

    from tuning.store import Store

    pg = restartable_postgresql
    with Store(pg.url, outage_s=30) as store:
        sid = store.create_study("st", model="m", task="t", search_space={}, config={}).id
        store.get_study("st")  # a pooled connection, which the stop below cuts
        pg.stop("fast")
        down_at = time.monotonic()
        restart = threading.Timer(DOWN_S / 2, pg.start)
        restart.start()
        try:
            with caplog.at_level("WARNING", logger="tuning.store.store"):
                tid = store.start_trial(sid, {"threshold": 0.5})
                store.complete_trial(tid, values={"quality": 1.0}, metrics={})
        finally:
            restart.join()
        waited = time.monotonic() - down_at
        stats = store.retry_stats
        assert [t.status for t in store.trials(sid)] == ["completed"]  # once, not twice
        assert stats.outages == 1 and stats.retries >= 2 and stats.longest_outage_s >= DOWN_S / 2 - 0.5
        assert any("the database is unreachable" in r.message for r in caplog.records)
        assert any("the database is back after" in r.message for r in caplog.records)
        # Bounded: with the database gone for longer than the window, the write fails.
        store.outage_window_s = 1.0
        pg.stop("fast")
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError):
            store.start_trial(sid, {"threshold": 0.6})
        gave_up_s = time.monotonic() - started
        assert 1.0 <= gave_up_s < 10
        pg.start()
        assert len(store.trials(sid)) == 1
    report("PostgreSQL restart under a store write", downtime_s=round(DOWN_S / 2, 1), waited_s=round(waited, 1),
           retries=stats.retries, written_once=True, window_s=1.0, gave_up_after_s=round(gave_up_s, 1))


# ------------------------------------------------------------------------------ drill 2
def test_worker_node_lost_mid_trial_is_recorded_and_the_study_finishes(drill_dir, postgresql_url):
    """Two Ray nodes (1 CPU each) on loopback, the study's driver on the head: while both trials
    run, the second node's whole process session is stopped (what ``ray stop`` does there,
    without touching other clusters). The trial it ran is recorded failed with the reason, the
    study goes on on the head and finishes, and every finished trial is in PostgreSQL."""
    from test_multinode import RayNode, alive_nodes, can_set_hostname, free_ports

    wd = drill_dir / "wd"
    config = study_yaml(wd, "nodelost", trials=4)
    hostnames = ("ffnskip-node-a", "ffnskip-node-b") if can_set_hostname() else (None, None)
    gcs, dash, client, *ports = free_ports(3 + 2 * 6)
    env = driver_env(drill_dir)
    marks = drill_dir / "marks"
    marks.mkdir()
    env.update(FFNSKIP_DRILL_MARKS=str(marks), FFNSKIP_DRILL_SLOW_S="6")

    def node_ports(offset: int) -> list[str]:
        p = ports[offset:offset + 6]
        return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5])]

    common = ["--num-gpus", "0", "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
              "--node-ip-address", "127.0.0.1", "--num-cpus", "1"]
    dashboard = f"http://127.0.0.1:{dash}"
    nodes: list[RayNode] = []
    driver = None
    try:
        head = RayNode("head", ["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                                str(dash), "--ray-client-server-port", str(client), "--temp-dir",
                                str(drill_dir / "ra"), *node_ports(0), *common],
                       env, drill_dir / "head.log", hostnames[0])
        nodes.append(head)

        def wait_nodes(n: int, node: RayNode) -> None:
            deadline = time.monotonic() + 120
            while True:
                assert node.alive(), f"Ray node {node.name} exited:\n{node.tail()}"
                try:
                    if len(alive_nodes(dashboard, None)) == n:
                        return
                except (OSError, KeyError, ValueError):
                    pass
                assert time.monotonic() < deadline, f"{n} Ray node(s) not up in 120 s:\n{node.tail()}"
                time.sleep(0.5)

        wait_nodes(1, head)
        worker = RayNode("worker", ["--address", f"127.0.0.1:{gcs}", "--temp-dir", str(drill_dir / "rb"),
                                    *node_ports(6), *common], env, drill_dir / "worker.log", hostnames[1])
        nodes.append(worker)
        wait_nodes(2, worker)

        driver = Driver(["--config", str(config), "--db", postgresql_url, "--address", f"127.0.0.1:{gcs}"], wd, env,
                        drill_dir / "driver.log")
        deadline = time.monotonic() + 180
        while True:  # a trial evaluating on the second node
            on_b = set(session_pids(worker.sid))
            evaluating = [int(m.name) for m in marks.iterdir() if int(m.name) in on_b]
            if evaluating:
                break
            assert driver.proc.poll() is None, f"the study ended first:\n{driver.tail()}"
            assert time.monotonic() < deadline, f"no trial ran on the second node:\n{driver.tail()}"
            time.sleep(0.1)
        at_loss = trial_counts(postgresql_url, "nodelost")
        lost_at = time.monotonic()
        for pid in session_pids(worker.sid):  # the node is lost: all its processes at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = worker.stop()
        assert not left, f"processes of the lost node outlived it: {left}"
        rc = driver.wait(timeout=240)
        finish_s = time.monotonic() - lost_at
        out = driver.tail(200_000)
        assert rc == 0, f"the study did not survive the lost node ({rc}):\n{out[-6000:]}"
    finally:
        if driver is not None:
            if driver.proc.poll() is None:
                driver.kill_session()
            driver.reap(timeout=10)
        left = {n.name: n.stop() for n in reversed(nodes)}
    assert not any(left.values()), f"Ray processes outlived the test: {left}"

    import psycopg

    with psycopg.connect(postgresql_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        rows = conn.execute("SELECT t.status, t.error, t.quality, t.node FROM ffnskip_trials t JOIN ffnskip_studies s "
                            "ON s.id = t.study_id WHERE s.name = 'nodelost' ORDER BY t.id").fetchall()
        samples = dict(conn.execute("SELECT t.id, count(x.id) FROM ffnskip_trials t LEFT JOIN ffnskip_samples x "
                                    "ON x.trial_id = t.id WHERE t.status = 'completed' GROUP BY t.id").fetchall())
    statuses = Counter(r[0] for r in rows)
    failed = [r for r in rows if r[0] == "failed"]
    assert len(rows) == 4 and statuses.get("running", 0) == 0, rows
    assert len(failed) == 1, rows  # the lost node's trial
    assert all(r[1] and ("died" in r[1].lower() or "node" in r[1].lower()) for r in failed), failed
    assert all(n == 2 for n in samples.values()) and len(samples) == statuses["completed"]
    if hostnames[0]:
        assert {r[3] for r in rows if r[0] == "completed"} <= set(hostnames)
    states = optuna_states(postgresql_url, "nodelost")
    assert states.get("RUNNING", 0) == 0 and states.get("COMPLETE") == statuses["completed"], states
    report("worker node lost mid-trial", trials=4, running_at_loss=at_loss.get("running", 0),
           completed=statuses["completed"], failed=len(failed),
           failure_reason=failed[0][1].splitlines()[0][:80], running_after=0, finish_after_loss_s=round(finish_s, 1),
           in_postgresql=len(rows))
