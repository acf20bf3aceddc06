"""Load test of an ffnskip (or any OpenAI-compatible) server: N concurrent streaming clients for T s.

    python benchmarks/load.py --url http://127.0.0.1:8000 --concurrency 8 --duration 30

Each client sends streaming requests back to back (chat by default, ``--endpoint completions``
for raw prompts) until the duration is over (or, with ``--requests N``, until N requests have
been sent in all), then finishes the request it has in flight. ``--warmup N`` first sends N
requests that are not counted; ``--ignore-eos`` asks for exactly ``max_tokens`` tokens (vLLM's
and our extension) and ``--usage`` for ``stream_options.include_usage`` (the token count then
comes from the server's usage chunk). ``benchmarks/load_vs_vllm.py`` runs this against our
server and vLLM's, side by side. Printed
(or ``--json``): requests, errors, completion tokens per second over the run, time to first token
p50/p99, inter-token latency p50/p99 and the mean ``ffnskip.skip_ratio`` of the responses. An
error is a non-200 status, an ``error`` event in the stream, a stream that does not end with
``data: [DONE]``, or a connection failure. Exit status 1 when there were errors and
``--fail-on-error`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = (
    "Tell me about the sea.",
    "What is the capital of France?",
    "Write one sentence about the moon.",
    "Name three colours.",
    "Why is the sky blue?",
    "Give me a tip for learning to code.",
    "What do bees make?",
    "Describe a cat in a few words.",
)


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    skip_ratios: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, args, i: int, tally: Tally) -> None:
    prompt = PROMPTS[i % len(PROMPTS)]
    body: dict = {"max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True}
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.usage:
        body["stream_options"] = {"include_usage": True}
    if args.model:
        body["model"] = args.model
    if args.endpoint == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    t0 = time.perf_counter()
    last = None
    done = False
    tokens_seen = 0
    usage_tokens = None
    tally.requests += 1
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                tally.error(f"HTTP {resp.status_code}: {text}")
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    tally.error(f"stream error: {ev['error']}")
                    return
                choice = (ev.get("choices") or [{}])[0]
                text = choice.get("text") if args.endpoint != "chat" else (choice.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    if last is None:
                        tally.ttft.append(now - t0)
                    else:
                        tally.itl.append(now - last)
                    last = now
                    tokens_seen += 1
                if ev.get("usage"):
                    usage_tokens = ev["usage"].get("completion_tokens")
                if ev.get("ffnskip"):
                    tally.skip_ratios.append(float(ev["ffnskip"].get("skip_ratio", 0.0)))
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        tally.error(f"{type(exc).__name__}: {exc}")
        return
    if not done:
        tally.error("the stream ended without data: [DONE]")
        return
    tally.tokens += usage_tokens if usage_tokens is not None else tokens_seen


async def client_loop(client, args, cid: int, stop_at: float, tally: Tally, budget: list[int] | None = None) -> None:
    """Requests back to back until ``stop_at``, or while ``budget[0]`` (requests left to send,
    shared by the clients) is positive."""
    i = cid
    while True:
        if budget is not None:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        elif time.perf_counter() >= stop_at:
            return
        await one_request(client, args, i, tally)
        i += args.concurrency


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, timeout=timeout,
                                 limits=limits) as client:
        if args.model is None:
            try:
                r = await client.get("/v1/models")
                r.raise_for_status()
                args.model = r.json()["data"][0]["id"]
            except Exception as exc:  # noqa: BLE001 - the server may not list models
                print(f"load: GET /v1/models failed ({exc}); sending no model name", file=sys.stderr)
        if args.warmup:
            warm = Tally()
            left = [args.warmup]
            await asyncio.gather(*(client_loop(client, args, c, 0.0, warm, left) for c in range(args.concurrency)))
            if warm.errors:
                print(f"load: {warm.errors} of {warm.requests} warm-up requests failed: {warm.error_samples[:1]}",
                      file=sys.stderr)
        tally = Tally()
        budget = [args.requests] if args.requests else None
        start = time.perf_counter()
        stop_at = start + args.duration
        await asyncio.gather(*(client_loop(client, args, c, stop_at, tally, budget) for c in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {
        "url": args.url, "endpoint": args.endpoint, "model": args.model, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "duration_s": round(elapsed, 2), "requests": tally.requests, "errors": tally.errors,
        "completion_tokens": tally.tokens,
        "throughput_tokens_per_s": round(tally.tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "requests_per_s": round((tally.requests - tally.errors) / elapsed, 3) if elapsed > 0 else 0.0,
        "ttft_ms_p50": ms(percentile(tally.ttft, 0.5)), "ttft_ms_p99": ms(percentile(tally.ttft, 0.99)),
        "itl_ms_p50": ms(percentile(tally.itl, 0.5)), "itl_ms_p99": ms(percentile(tally.itl, 0.99)),
        "mean_skip_ratio": round(statistics.fmean(tally.skip_ratios), 4) if tally.skip_ratios else None,
        "error_samples": tally.error_samples,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="N concurrent streaming clients for T seconds against an OpenAI-compatible URL")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default http://127.0.0.1:8000)")
    p.add_argument("-n", "--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("-t", "--duration", type=float, default=30.0, help="seconds to keep sending (default 30)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("FFNSKIP_API_KEY"), help="default: $FFNSKIP_API_KEY")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request read timeout in seconds (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when any request failed")
    p.add_argument("--requests", type=int, default=None,
                   help="send this many requests in all instead of sending for --duration")
    p.add_argument("--warmup", type=int, default=0, help="requests sent first and not counted (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens (ignore_eos)")
    p.add_argument("--usage", action="store_true", help="ask for the usage chunk (stream_options.include_usage)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for flag, v in (("--concurrency", args.concurrency), ("--max-tokens", args.max_tokens)):
        if v <= 0:
            p.error(f"{flag} must be positive; got {v}")
    if args.duration <= 0:
        p.error(f"--duration must be positive; got {args.duration}")
    if args.requests is not None and args.requests <= 0:
        p.error(f"--requests must be positive; got {args.requests}")
    if args.warmup < 0:
        p.error(f"--warmup must be 0 or more; got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
    else:
        f = lambda v, unit="": "-" if v is None else f"{v}{unit}"  # noqa: E731
        print(f"{out['requests']} requests by {out['concurrency']} clients in {out['duration_s']} s "
              f"({args.endpoint}, max_tokens {args.max_tokens})")
        print(f"throughput   {out['throughput_tokens_per_s']} tokens/s, {out['requests_per_s']} requests/s "
              f"({out['completion_tokens']} completion tokens)")
        print(f"TTFT         p50 {f(out['ttft_ms_p50'], ' ms')}  p99 {f(out['ttft_ms_p99'], ' ms')}")
        print(f"inter-token  p50 {f(out['itl_ms_p50'], ' ms')}  p99 {f(out['itl_ms_p99'], ' ms')}")
        print(f"skip ratio   mean {f(out['mean_skip_ratio'])}")
        print(f"errors       {out['errors']}")
        for e in out["error_samples"]:
            print(f"  {e}")
    return 1 if args.fail_on_error and out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
