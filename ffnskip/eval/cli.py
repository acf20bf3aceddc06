"""``ffnskip evaluate``: one task, one policy, against the same model's dense decoding.

A core verb of the ``ffnskip`` command line (:data:`ffnskip.cli.VERBS`, :func:`register`).
Progress bars go to stderr; the result is a table on stdout, or with ``--json`` one JSON object
(see :meth:`ffnskip.eval.EvalReport.to_dict`). ``--output FILE`` also writes the JSON to a file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import CLIError, add_model_arg, load_model_cli, nonneg_int, positive_int


def register(sub) -> None:
    from .tasks import TASKS

    p = sub.add_parser(
        "evaluate",
        help="evaluate a skip policy on a task against the same model's dense output",
        description="Evaluate a skip policy on a task (" + ", ".join(TASKS) + ") against the same model's dense "
        "decoding: task metrics, fidelity to dense, degeneration and speed.",
    )
    p.add_argument("--task", default="factoid_qa", help=f"one of {', '.join(TASKS)} (default: factoid_qa)")
    add_model_arg(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--policy", metavar="FILE", help="skip policy JSON file (default: the default adaptive policy)")
    g.add_argument("--policy-json", metavar="JSON", help='skip policy as inline JSON, e.g. \'{"mode": "random"}\'')
    p.add_argument("--limit", type=positive_int("--limit"), default=None,
                   help="evaluate a deterministic subset of N samples (perplexity: N tokens)")
    p.add_argument("--seed", type=nonneg_int("--seed"), default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--data", metavar="FILE", default=None,
                   help="your own data: JSONL, JSON array or CSV with fields question and answer (factoid_qa)")
    p.add_argument("--field", metavar="NAME=COLUMN", action="append", default=[],
                   help="map a task field to a column of --data, e.g. --field answer=gold (repeatable)")
    p.add_argument("--data-dir", default=None, help="evaluation data directory (default: $FFNSKIP_DATA_DIR or ../shared/data)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="use the chat template (default: off for factoid_qa, on for summarization and conversation)")
    p.add_argument("--max-new-tokens", type=positive_int("--max-new-tokens"), default=None,
                   help="tokens per output (default per task: factoid 24, summarization 200, conversation 256 "
                   "per turn; perplexity: window length 256)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=1)
    p.add_argument("--no-speed", action="store_true", help="skip the alternating dense/policy speed runs")
    p.add_argument("--speed-items", type=positive_int("--speed-items"), default=3, help="prompts in the speed runs (default 3)")
    p.add_argument("--no-nll", action="store_true", help="skip the teacher-forced nll_vs_dense (reported as null)")
    p.add_argument("--no-cache", action="store_true", help="keep the dense cache in memory only (no disk cache)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint of an LLM judge (key: $FFNSKIP_JUDGE_API_KEY)")
    p.add_argument("--judge-model", default=None, help="the judge's model name")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--samples", action="store_true", help="include per-sample outputs and scores in the JSON")
    p.add_argument("--output", metavar="FILE", default=None, help="also write the JSON object to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int("--threads"), default=None,
                   help="torch CPU threads (default: torch's choice, one per core; the fast decode path runs one "
                   "GEMV per core. Use 1 when other processes share the cores: oversubscribed threads lose "
                   "several times over)")
    p.set_defaults(func=cmd_evaluate)


def _policy_spec(args):
    """The ``--policy`` / ``--policy-json`` policy, validated before the model loads (an
    unmeasured shortgpt policy is measured once the model is there); None: not given."""
    if not (args.policy or args.policy_json):
        return None
    from ..cli import policy_from_args

    return policy_from_args(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .cache import DenseCache, default_dense_cache
    from .harness import evaluate
    from .tasks import get_task

    task = get_task(args.task)  # unknown task: one line, before anything loads
    spec = _policy_spec(args)
    if args.judge_model and not args.judge_url:
        raise CLIError("--judge-model needs --judge-url")
    judge = None
    if args.judge_url:
        from .judge import JudgeConfig

        judge = JudgeConfig(url=args.judge_url, model=args.judge_model or "")
        if task.name not in ("conversation", "summarization"):
            raise CLIError(f"--judge-url: the judge scores conversation and summarization only, not {task.name}")
    if args.data is None and args.field:
        raise CLIError("--field only applies to a --data file")
    if task.kind != "perplexity":  # data errors before the model loads (perplexity needs the tokenizer)
        task.load(data_dir=args.data_dir, data_file=args.data, fields=args.field, limit=args.limit, seed=args.seed)
    if args.output:
        out_dir = Path(args.output).expanduser().resolve().parent
        if not out_dir.is_dir():
            raise CLIError(f"--output: directory {out_dir} does not exist")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model_cli(args)
    cache = DenseCache(None) if args.no_cache else default_dense_cache()
    try:
        report = evaluate(
            model,
            tokenizer,
            spec,
            task.name,
            limit=args.limit,
            seed=args.seed,
            data_file=args.data,
            fields=args.field,
            data_dir=args.data_dir,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            dense_cache=cache,
            measure_speed=not args.no_speed,
            progress=not args.no_progress,
            model_name=args.model,
            judge=judge,
            speed_items=args.speed_items,
            score_nll=not args.no_nll,
        )
    except NotImplementedError as exc:
        raise CLIError(str(exc)) from None
    data = report.to_dict(samples=args.samples)
    if args.output:
        Path(args.output).expanduser().write_text(json.dumps(data, indent=1) + "\n")
    if args.json:
        print(json.dumps(data))
    else:
        print(format_table(data))
        if args.output:
            print(f"JSON written to {args.output}")
    return 0


# ---------------------------------------------------------------------- table
_ORDER = (
    "accuracy", "exact_match", "rouge1", "rouge2", "rouge_l", "perplexity", "judge_score",
    "output_identity", "answer_agreement_short", "rouge_l_vs_dense", "first_divergence", "diverged", "nll_vs_dense",
    "repetition", "collapsed", "empty", "skip_ratio", "skip_ratio_post_warmup", "generated_tokens",
    "tokens_per_s",
)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def format_table(data: dict) -> str:
    """The report as a small text table: one row per metric, dense and policy side by side."""
    prim = data["primary"]["name"]
    pol = data["policy"]
    pol_txt = ", ".join(f"{k}={v}" for k, v in pol.items() if v is not None)
    lines = [
        f"{data['task']} on {data['model']}: {data['n']} samples | policy {pol_txt}",
        f"{'metric':<24}{'dense':>12}{'policy':>12}   policy - dense [95% CI, paired over n samples]",
    ]
    vs = data.get("vs_dense") or {}
    keys = [k for k in _ORDER if k in data["dense"] or k in data["skip"]]
    for k in keys:
        dv, sv = data["dense"].get(k), data["skip"].get(k)
        if isinstance(dv, (dict, list)) or isinstance(sv, (dict, list)):
            continue
        mark = " *" if k == prim else ""
        diff = ""
        iv = vs.get(k)
        if iv and iv.get("value") is not None:
            diff = f"   {iv['value']:+.4f} [{_fmt(iv['low'])}, {_fmt(iv['high'])}] n={iv['n']}"
        lines.append(f"{k + mark:<24}{_fmt(dv) if k in data['dense'] else '':>12}{_fmt(sv):>12}{diff}")
    for side in ("dense", "skip"):
        bb = data[side].get("by_bucket")
        if bb:
            for b, vals in bb.items():
                txt = " ".join(f"{m}={_fmt(v)}" for m, v in vals.items())
                lines.append(f"  {side} {b}: {txt}")
    sp, ci = data.get("speedup"), data.get("speedup_ci95")
    pairs = (data.get("speed") or {}).get("pairs")
    if sp and ci:
        lines.append(f"speedup {sp:.3f}x [95% CI {ci[0]:.3f}, {ci[1]:.3f}] over {pairs} paired runs")
    else:
        lines.append(f"speedup {sp:.3f}x (no interval)" if sp else "speedup -")
    lines.append(f"* primary metric ({'higher' if data['primary']['higher_is_better'] else 'lower'} is better); "
                 f"data sha256 {data['data_fingerprint'][:16]}")
    if data.get("judge"):
        j = data["judge"]
        lines.append(f"judge {j['model']} at {j['url']}: {j['calls']} calls, {j['unparseable']} unparseable, "
                     f"{j['errors']} failed")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
