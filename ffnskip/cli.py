"""The ``ffnskip`` command line: one table of verbs (:data:`VERBS`).

The core verbs are here (``generate``, ``profile``, ``bench``) and in :mod:`ffnskip.eval.cli`
(``evaluate``); ``tune``, ``results`` (:mod:`tuning.cli`) and ``serve`` (:mod:`serve.cli`) are
named by their registration functions as ``"module:function"`` strings, imported when the parser
is built, so ``import ffnskip.cli`` imports neither package. A verb whose package, or a package it
needs, is missing is one line of error with the ``pip install`` hint. Entry points print;
libraries log.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import FFNSkipError

log = logging.getLogger("ffnskip")


class CLIError(FFNSkipError):
    """A user error: printed as one line, exit status 2, no traceback."""


# ---------------------------------------------------------------------- shared options
def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="alias, HF directory / hub id, or .gguf file (default: smollm2-135m)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--policy", metavar="FILE", help="skip policy JSON file")
    g.add_argument("--policy-json", metavar="JSON", help="skip policy as inline JSON")


def policy_from_args(args: argparse.Namespace):
    """The policy of ``--policy FILE`` / ``--policy-json JSON`` (default: the adaptive default),
    through :func:`ffnskip.policy.parse_policy`; an error names the flag and the field."""
    from .policy import PolicyError, parse_policy

    path, text = getattr(args, "policy", None), getattr(args, "policy_json", None)
    try:
        return parse_policy(text, path=path or None)
    except PolicyError as exc:
        raise CLIError(f"{'--policy' if path else '--policy-json'}: {exc}") from None


def _bounded(flag: str, cast: Callable[[str], Any], what: str, ok: Callable[[Any], bool], bound: str):
    """An argparse ``type=``: ``cast`` the text, and reject it unless ``ok``, naming ``flag``."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {what}; got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{flag} must be {bound}; got {text.strip()}")
        return v

    return parse


def positive_int(flag: str) -> Callable[[str], int]:
    return _bounded(flag, int, "an integer", lambda v: v > 0, "positive")


def nonneg_int(flag: str) -> Callable[[str], int]:
    return _bounded(flag, int, "an integer", lambda v: v >= 0, ">= 0")


def nonneg_float(flag: str) -> Callable[[str], float]:
    return _bounded(flag, float, "a number", lambda v: v >= 0, ">= 0")  # nan fails: nan >= 0 is False


def load_model_cli(args: argparse.Namespace):
    from .loading import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    log.info("loaded %s in %.1f s", args.model, time.perf_counter() - t0)
    return model, tokenizer


# ---------------------------------------------------------------------- generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with FFN skipping, streamed to the terminal")
    add_model_arg(p)
    add_policy_args(p)
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--raw", action="store_true", help="no chat template: tokenize exactly as tokenizer(prompt)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .decode import SamplingParams, encode_prompt, generate
    from .engine import SeqStats
    from .fastpath import prepare

    policy = policy_from_args(args)
    for i, prompt in enumerate(args.prompts):
        if not prompt.strip():
            raise CLIError(f"PROMPT {i + 1} is empty")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    model, tokenizer = load_model_cli(args)
    prepare(model)  # the kernel library build (first use on a machine) before the stream starts
    ids = [encode_prompt(tokenizer, p, raw=args.raw) for p in args.prompts]
    results = []
    stream = not args.json
    multi = len(ids) > 1
    start = time.perf_counter()
    for ev in generate(model, tokenizer, ids, policy, params, results=results):
        if stream and ev.delta:
            if multi:
                continue  # several prompts: print each text whole at the end
            sys.stdout.write(ev.delta)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    total = sum(r.stats.generated_tokens for r in results)
    tps = total / elapsed if elapsed > 0 else 0.0
    pooled = SeqStats.merge([r.stats for r in results])
    if args.json:
        out = {
            "model": args.model,
            "policy": policy.to_dict(),
            "outputs": [
                {
                    "prompt": prompt,
                    "text": r.text,
                    "generated_tokens": r.stats.generated_tokens,
                    "skipped_ffn": r.stats.skipped_ffn,
                    "skip_ratio": r.stats.skip_ratio,
                    "skip_ratio_post_warmup": r.stats.skip_ratio_post_warmup,
                    "skipped_per_layer": r.stats.skipped_per_layer,
                    "trigger_layers": r.stats.trigger_layers,
                    "finish_reason": r.finish_reason,
                    "syncs_per_token": r.stats.syncs_per_token,
                }
                for prompt, r in zip(args.prompts, results)
            ],
            "tokens_per_s": tps,
        }
        print(json.dumps(out))
        return 0
    if multi:
        for i, (prompt, r) in enumerate(zip(args.prompts, results)):
            print(f"--- [{i + 1}] {prompt}\n{r.text}")
    else:
        print()
    print(
        f"[{total} tokens in {elapsed:.2f} s, {tps:.1f} tok/s | skip_ratio {pooled.skip_ratio:.3f}, "
        f"post-warm-up {pooled.skip_ratio_post_warmup:.3f} | {pooled.syncs_per_token:.1f} host syncs/token]"
    )
    return 0


# ---------------------------------------------------------------------- profile
def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="per-layer residual saturation (cos before/after FFN), suggested band and threshold")
    add_model_arg(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", choices=["wikitext2"], default="wikitext2", help="profiling text (default: wikitext2 test)")
    src.add_argument("--text-file", metavar="F", help="profile on this UTF-8 text file instead")
    p.add_argument("--data-dir", default=None, help="evaluation data directory (default: $FFNSKIP_DATA_DIR or ../shared/data)")
    p.add_argument("--tokens", type=positive_int("--tokens"), default=512, help="tokens to run densely (default 512)")
    p.add_argument("--plot", metavar="F.png", help="write the saturation plot here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from .data import DataError, wikitext2_text
    from .saturation import plot, profile

    if args.text_file:
        try:
            text = open(args.text_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CLIError(f"--text-file: cannot read {args.text_file}: {exc}") from None
    else:
        try:
            text = wikitext2_text(args.data_dir)
        except DataError as exc:
            raise CLIError(str(exc)) from None
    if not text.strip():
        raise CLIError("the profiling text is empty")
    model, tokenizer = load_model_cli(args)
    prof = profile(model, tokenizer, text, tokens=args.tokens, model_name=args.model)
    if args.plot:
        plot(prof, args.plot)
    if args.json:
        print(json.dumps(prof.to_dict()))
        return 0
    print(f"{'layer':>5}  {'mean cos':>9}  {'p10 cos':>9}  {'influence':>9}")
    for lp in prof.layers:
        band = " *" if prof.suggested_layer_start <= lp.layer < prof.suggested_layer_end else ""
        print(f"{lp.layer:>5}  {lp.mean_cos:>9.4f}  {lp.p10_cos:>9.4f}  {lp.block_influence:>9.4f}{band}")
    print(
        f"suggested: layer_start={prof.suggested_layer_start} layer_end={prof.suggested_layer_end} "
        f"threshold={prof.suggested_threshold} (over {prof.tokens} tokens; * = suggested band)"
    )
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


# ---------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    s = bsub.add_parser("speed", help="tokens/s: transformers generate vs ffnskip dense vs ffnskip with a policy, in one run")
    add_model_arg(s)
    add_policy_args(s)
    s.add_argument("--batch-size", type=positive_int("--batch-size"), default=1)
    s.add_argument("--new-tokens", type=positive_int("--new-tokens"), default=64)
    s.add_argument("--repeats", type=positive_int("--repeats"), default=4)
    s.add_argument("--threads", type=positive_int("--threads"), default=None, help="torch intra-op threads (default: torch's choice)")
    s.add_argument("--no-fast", action="store_true", help="decode steps through the model's own forward instead of the lean path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_speed)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    import torch

    from .bench import bench_speed, format_table

    policy = policy_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_cli(args)

    def progress(i, n):
        if not args.json:
            print(f"  repeat {i}/{n} done", file=sys.stderr, flush=True)

    result = bench_speed(
        model, tokenizer, policy, batch_size=args.batch_size, new_tokens=args.new_tokens,
        repeats=args.repeats, fast=False if args.no_fast else None, progress=progress,
    )
    result["model"] = args.model
    result["policy"] = policy.to_dict()
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


# ---------------------------------------------------------------------- the verbs
@dataclass(frozen=True)
class Verb:
    """One verb of the ``ffnskip`` command line."""

    name: str
    register: str | Callable[[Any], None]
    """Adds the verb's parser to the sub-parsers (``register(sub)``): a function here, or a
    ``"module:function"`` of another package, imported only when the parser is built, so that
    ``import ffnskip.cli`` imports neither ``tuning`` nor ``serve``."""
    extra: str | None = None
    """The ``pip install 'ffnskip[extra]'`` extra whose packages the verb needs (the hint when one
    is missing)."""


VERBS: tuple[Verb, ...] = (
    Verb("generate", _add_generate),
    Verb("profile", _add_profile),
    Verb("bench", _add_bench),
    Verb("evaluate", "ffnskip.eval.cli:register", extra="eval"),
    Verb("tune", "tuning.cli:register_tune", extra="tune"),
    Verb("results", "tuning.cli:register_results", extra="tune"),
    Verb("serve", "serve.cli:register", extra="serve"),
    Verb("models", "ffnskip.install:register"),
)
"""Every verb of ``ffnskip``, in the order of ``ffnskip --help``."""

_FIRST_PARTY = frozenset({"ffnskip", "tuning", "serve"})


def _registration(verb: Verb) -> Callable[[Any], None]:
    if callable(verb.register):
        return verb.register
    module, _, name = verb.register.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffnskip", description="FFN-SkipLLM: adaptive FFN skipping for faster decoding")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        try:
            register = _registration(verb)
        except ImportError as exc:  # its package, or a package that one imports, is not installed
            _add_unavailable(sub, verb, exc)
            continue
        register(sub)
    return parser


def _missing_message(exc: ImportError, extra: str | None) -> str:
    what = f"the module '{exc.name}' is not installed" if exc.name else f"a module is missing ({exc})"
    hint = f"; install it with: pip install 'ffnskip[{extra}]'" if extra else ""
    return f"{what}{hint}"


def _add_unavailable(sub, verb: Verb, exc: ImportError) -> None:
    """A stand-in for a verb that cannot be registered: any arguments, one line of error."""
    p = sub.add_parser(verb.name, help=f"(unavailable: {exc})", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    message = _missing_message(exc, verb.extra)

    def run(args):
        raise CLIError(message)

    p.set_defaults(func=run, unavailable=True)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, shown as one line without a traceback."""
    from .adapters import UnsupportedArchitecture
    from .data import DataError
    from .decode import GenerationError
    from .policy import PolicyError

    errs: list[type[BaseException]] = [CLIError, PolicyError, GenerationError, UnsupportedArchitecture, DataError]
    try:
        from .loading import ModelError

        errs.append(ModelError)
    except ImportError:
        pass
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    extra = next((v.extra for v in VERBS if v.name == args.command), None)
    return run_entry_point(f"ffnskip {args.command}", args.func, args, extra=extra)


def run_entry_point(label: str, func: Callable[[argparse.Namespace], Any], args: argparse.Namespace,
                    extra: str | None = None) -> int:
    """Run a command of an entry point (``ffnskip``, ``python -m tuning``): logging per ``--verbose``,
    a user's error as one line ``<label>: error: ...`` and exit status 2, Ctrl-C as 130. A
    third-party module that the command needs and that is not installed is such an error too,
    with the ``pip install 'ffnskip[extra]'`` hint when ``extra`` is given."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(func(args) or 0)
    except user_errors() as exc:
        print(f"{label}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] in _FIRST_PARTY:
            raise  # a bug, not a missing dependency
        print(f"{label}: error: {_missing_message(exc, extra)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
