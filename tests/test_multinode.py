"""A two-node Ray cluster on one machine runs a tuning study submitted with ``ray job submit``.

What a user does on a real cluster, in miniature:

* a Ray head (``ray start --head``) and a second Ray node (``ray start --address`` on loopback),
  separate process trees with their own temp dirs, ports, model caches and (where Linux UTS
  namespaces are available, as root in CI) their own host name;
* a real PostgreSQL (the ``postgresql_url`` fixture of tests/conftest.py);
* ``ray job submit --working-dir WD -- python -m tuning --config study.yaml --db URL``: the
  working dir (a tiny random LLaMA with a word-level tokenizer, a 2-question data file and the
  study config) is uploaded and unpacked on both nodes;
* Ray's token authentication on (as in every deployment of cluster/): nodes, driver and client
  share a token, and the Jobs API refuses a request without it;
* then every trial row is in PostgreSQL, completed, the trials ran on both nodes (their ``node``
  column names both host names) and each node cached what it used in its own cache directory.

Everything this test starts is stopped afterwards: each ``ray start --block`` runs in its own
session, and its whole process session is signalled by id (never ``ray stop``, which would kill
other Ray clusters on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the multi-node test needs Linux")

STUDY = """\
study: multinode
model: tiny-model                  # relative: resolved in the job's working dir on each node
task: factoid_qa
data_file: questions.jsonl
limit: 2
max_new_tokens: 4
seed: 0
trials: 2
concurrency: 2                     # both trials at once: one per node (each node has 1 CPU)
resources: {cpu: 1, gpu: 0}
objectives: [quality, skip_ratio]
max_quality_drop: null
progress: false
evaluator: barrier_eval:evaluate   # ffnskip.eval.evaluate, trials meeting at a barrier first
start_points:
  - {threshold: 0.8, warmup_tokens: 0, layer_start: 1, layer_end: 7, skip_budget: 2, dense_every: 8}
  - {threshold: 0.95, warmup_tokens: 1, layer_start: 2, layer_end: 6, skip_budget: 1, dense_every: 2}
"""

# Both trials must be running at the same time for the test to show where they run: each waits at
# a barrier (a named Ray actor) for the other before it evaluates. As each node has one CPU, the
# two trial actors are then on different nodes. Without it, Ray Tune may reuse the first node's
# actor for the second trial while the second node's actor is still starting (a tiny model's
# trial takes well under a second).
BARRIER_EVAL = """\
import asyncio
import os

import ray

from ffnskip.eval import evaluate as ffnskip_evaluate

PARTIES = 2
TIMEOUT_S = 150


@ray.remote(num_cpus=0)
class Barrier:
    def __init__(self):
        self.arrived = set()

    async def arrive(self, who):
        self.arrived.add(who)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        while len(self.arrived) < PARTIES and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return sorted(self.arrived)


def evaluate(model, tokenizer, policy, task, **kwargs):
    if policy.mode != "dense":  # the trials, not the dense baseline
        barrier = Barrier.options(name="ffnskip-multinode-barrier", get_if_exists=True).remote()
        ray.get(barrier.arrive.remote(f"{os.uname().nodename}:{os.getpid()}"))
    return ffnskip_evaluate(model, tokenizer, policy, task, **kwargs)
"""

QUESTIONS = [
    {"question": "which city is the capital of france ?", "answer": "paris"},
    {"question": "what colour is the sky ?", "answer": "blue"},
]


# ------------------------------------------------------------------------------ the working dir
def make_working_dir(wd: Path) -> None:
    """A tiny random LLaMA (8 layers) with a word-level tokenizer, the data and the study."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "\n", *"please give answer to this question : the is . ? which city capital of "
             "france paris what colour sky blue a an".split()]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(wd / "tiny-model")
    fast.save_pretrained(wd / "tiny-model")
    (wd / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (wd / "study.yaml").write_text(STUDY)
    (wd / "barrier_eval.py").write_text(BARRIER_EVAL)


# ------------------------------------------------------------------------------ processes
def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def can_set_hostname() -> bool:
    """Whether a child can get a host name of its own (a UTS namespace: root, util-linux)."""
    if not shutil.which("unshare") or not shutil.which("hostname"):
        return False
    r = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname ffnskip-probe && hostname"],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and r.stdout.strip() == "ffnskip-probe"


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (everything a ``start_new_session`` child started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[3]) == sid:  # state ppid pgrp session ...
            pids.append(int(entry.name))
    return pids


class RayNode:
    """One ``ray start --block`` in a session of its own; :meth:`stop` ends that whole session."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path, hostname: str | None):
        cmd = [RAY, "start", "--block", *args]
        if hostname:
            cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *cmd]
        self.name, self.log = name, log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.sid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> list[int]:
        """SIGTERM (``ray start --block`` then stops its processes), then SIGKILL what is left.
        Returns the pids still alive at the end (should be none)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 20
        left = session_pids(self.sid)
        while left and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
            left = session_pids(self.sid)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log_file.close()
        return left


def http_json(url: str, token: str | None, timeout: float = 5.0):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return json.loads(r.read().decode())


def alive_nodes(dashboard: str, token: str) -> list[dict]:
    """The cluster's alive nodes, from the dashboard's state API."""
    data = http_json(f"{dashboard}/api/v0/nodes?limit=100&detail=1", token)
    return [n for n in data["data"]["result"]["result"] if n.get("state") == "ALIVE"]


# ------------------------------------------------------------------------------ the test
@pytest.fixture
def cluster_dir():
    # Short: Ray's Unix socket paths live under the temp dirs (at most 107 characters).
    d = Path(tempfile.mkdtemp(prefix="ffmn-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_tuning_job_spreads_over_two_nodes_into_postgresql(postgresql_url, cluster_dir):
    import psycopg

    wd = cluster_dir / "wd"
    wd.mkdir()
    hostnames = ("ffnskip-node-a", "ffnskip-node-b") if can_set_hostname() else (None, None)

    gcs, dash, client, *ports = free_ports(3 + 2 * 6)
    # Ray's token authentication stays on, as in every deployment of cluster/: the nodes, the job
    # driver, the workers and the submitting client share one token.
    token = secrets.token_hex(24)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base_env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )

    def node_env(name: str) -> dict[str, str]:
        home = cluster_dir / name / "home"  # ~/ray_results and friends stay in the test's dir
        home.mkdir(parents=True)
        # One model/dense cache per node, as on a real cluster ($FFNSKIP_CACHE_DIR/models, ...).
        return {**base_env, "HOME": str(home), "FFNSKIP_CACHE_DIR": str(cluster_dir / name / "cache")}

    def node_ports(offset: int) -> list[str]:
        p = ports[offset:offset + 6]
        return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5])]

    common = ["--num-gpus", "0", "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
    nodes: list[RayNode] = []
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        (cluster_dir / "a").mkdir()
        head = RayNode("head", [
            "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
            "--num-cpus", "1", "--temp-dir", str(cluster_dir / "a" / "ray"),
            *node_ports(0), *common,
        ], node_env("a"), cluster_dir / "head.log", hostnames[0])
        nodes.append(head)
        make_working_dir(wd)  # while the head starts
        deadline = time.monotonic() + 120
        while True:
            assert head.alive(), f"the Ray head exited:\n{head.tail()}"
            try:
                if len(alive_nodes(dashboard, token)) == 1:
                    break
            except (OSError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, f"the Ray head did not come up in 120 s:\n{head.tail()}"
            time.sleep(1)

        (cluster_dir / "b").mkdir()
        worker = RayNode("worker", [
            "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
            "--temp-dir", str(cluster_dir / "b" / "ray"),
            *node_ports(6), *common,
        ], node_env("b"), cluster_dir / "worker.log", hostnames[1])
        nodes.append(worker)
        deadline = time.monotonic() + 120
        while True:
            assert worker.alive(), f"the second Ray node exited:\n{worker.tail()}"
            try:
                if len(alive_nodes(dashboard, token)) == 2:
                    break
            except (OSError, KeyError, ValueError):
                pass
            assert time.monotonic() < deadline, f"the second node did not join in 120 s:\n{worker.tail()}"
            time.sleep(1)
        by_id = {n["node_id"]: n for n in alive_nodes(dashboard, token)}
        assert sum(n["resources_total"].get("CPU", 0) for n in by_id.values()) == 2
        # Without the token the Jobs API refuses.
        with pytest.raises(urllib.error.HTTPError) as refused:
            http_json(f"{dashboard}/api/jobs/", None)
        assert refused.value.code in (401, 403)

        # The job, as an operator submits it: the working dir goes to every node (the test's
        # database has no password, so its URL can stand on the command line).
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", dashboard, "--working-dir", str(wd), "--submission-id", "ffnskip-mn",
             "--runtime-env-json", json.dumps({"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}),
             "--", sys.executable, "-m", "tuning", "--config", "study.yaml", "--db", postgresql_url],
            env={**base_env, "HOME": str(cluster_dir)}, cwd=cluster_dir, capture_output=True, text=True, timeout=480,
        )
        out = submit.stdout + submit.stderr
        assert submit.returncode == 0, f"ray job submit failed ({submit.returncode}):\n{out[-6000:]}"
        assert "succeeded" in out.lower(), out[-6000:]
        assert "dense baseline:" in out and "trial" in out, out[-6000:]

        # Every trial reached PostgreSQL, completed, with its node and its samples.
        with psycopg.connect(postgresql_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            studies = conn.execute("SELECT id, name FROM ffnskip_studies").fetchall()
            assert [s[1] for s in studies] == ["multinode"]
            sid = studies[0][0]
            trials = conn.execute(
                "SELECT id, status, node, ray_trial_id, quality, skip_ratio, error FROM ffnskip_trials "
                "WHERE study_id = %s ORDER BY id", (sid,)).fetchall()
            samples = conn.execute(
                "SELECT t.id, count(s.id) FROM ffnskip_trials t LEFT JOIN ffnskip_samples s ON s.trial_id = t.id "
                "WHERE t.study_id = %s GROUP BY t.id", (sid,)).fetchall()
            baseline = conn.execute("SELECT node FROM ffnskip_baselines WHERE study_id = %s", (sid,)).fetchall()
            optuna_trials = conn.execute(
                "SELECT count(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "WHERE s.study_name = 'multinode'").fetchone()[0]
        assert len(trials) == 2, trials
        assert all(t[1] == "completed" for t in trials), trials
        assert all(t[4] is not None and t[5] is not None for t in trials), trials
        assert all(n == len(QUESTIONS) for _, n in samples), samples
        assert len(baseline) == 1 and baseline[0][0], baseline
        assert optuna_trials == 2  # Optuna's RDB storage lives in the same PostgreSQL

        # ... and the two trials ran on the two nodes.
        if hostnames[0]:
            assert {t[2] for t in trials} == set(hostnames), trials
        else:  # one host name for both nodes: ask Ray where the trial actors ran
            actors = http_json(f"{dashboard}/api/v0/actors?limit=1000&detail=1", token)["data"]["result"]["result"]
            trial_nodes = {a["node_id"] for a in actors if "ImplicitFunc" in a.get("class_name", "")}
            assert trial_nodes == set(by_id), (trial_nodes, list(by_id))
        # (Where the dense cache lands depends on where Ray places the baseline task and whether the
        # driver hands its decodes to the trials, so no per-node cache content is asserted here.)
    finally:
        left = {n.name: n.stop() for n in reversed(nodes)}
    assert not any(left.values()), f"Ray processes outlived the test: {left}"
