"""Command line: ``python -m tuning`` / ``ffnskip tune`` (run a study) and ``ffnskip results``.

Verbs of the core CLI's table (:data:`ffnskip.cli.VERBS` names :func:`register_tune` and
:func:`register_results`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ffnskip.cli import CLIError, nonneg_float, positive_int

from .config import ConfigError


# ------------------------------------------------------------------------------ tune
def add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="study configuration (see tuning/configs/)")
    p.add_argument("--db", metavar="URL", help="results database (default: the config's db, $FFNSKIP_DB, or sqlite:///ffnskip.db)")
    p.add_argument("--study", metavar="NAME", help="study name (default: the config's study, or the file name)")
    p.add_argument("--trials", type=positive_int("--trials"), help="trials in the study in total")
    p.add_argument("--limit", type=positive_int("--limit"), help="evaluate on the first N examples")
    p.add_argument("--concurrency", type=positive_int("--concurrency"), help="trials running at the same time")
    p.add_argument("--resume", action="store_true",
                   help="continue an existing study: keep its finished trials, run only the missing ones")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")


def cmd_tune(args: argparse.Namespace) -> int:
    from .config import load_config
    from .store import StoreError
    from .study import run_study

    try:
        cfg = load_config(args.config, study=args.study, trials=args.trials, limit=args.limit,
                          concurrency=args.concurrency)
        outcome = run_study(cfg, db=args.db, resume=args.resume, address=args.address)
    except ConfigError as exc:
        raise CLIError(f"{args.config}: {exc}") from None
    except StoreError as exc:
        raise CLIError(str(exc)) from None
    if outcome.ran["failed"] and not outcome.ran["completed"] and not outcome.ran.get("pruned"):
        print(f"every trial of this run failed: see ffnskip results trials --study {outcome.name} "
              f"--db {outcome.url}", file=sys.stderr)
        return 1
    return 0


def register_tune(sub) -> None:
    p = sub.add_parser("tune", help="search skip policies (Ray Tune + Optuna); results go to a SQL store",
                       description="Run or resume a tuning study. Same as: python -m tuning --config FILE.yaml")
    add_tune_args(p)
    p.set_defaults(func=cmd_tune)


# ------------------------------------------------------------------------------ results
def _common(p: argparse.ArgumentParser, study: bool = True) -> None:
    p.add_argument("--db", metavar="URL", help="results database (default: $FFNSKIP_DB or sqlite:///ffnskip.db)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    if study:
        p.add_argument("--study", required=True, metavar="NAME")


def register_results(sub) -> None:
    p = sub.add_parser("results", help="read tuning studies: trials, Pareto front, best policy, export, plot")
    rs = p.add_subparsers(dest="results_command", required=True, metavar="WHAT")

    q = rs.add_parser("studies", help="list the studies in the database")
    _common(q, study=False)
    q.set_defaults(func=cmd_studies)

    q = rs.add_parser("trials", help="a study's trials")
    _common(q)
    q.add_argument("--sort", metavar="M", help="best first by this column (e.g. skip_ratio, quality, tokens_per_s)")
    q.add_argument("--status", choices=["running", "completed", "failed", "pruned"], help="only trials in this state")
    q.set_defaults(func=cmd_trials)

    q = rs.add_parser("pareto", help="the non-dominated completed trials on the study's objectives")
    _common(q)
    q.set_defaults(func=cmd_pareto)

    q = rs.add_parser(
        "best", help="the policy to deploy (dense when no trial is reliably faster within the quality drop), as --policy JSON",
        description="The recommendation rule: among completed trials whose quality drop's 95%% upper end is at most "
                    "D and whose speed-up's 95%% lower end is above 1, the fastest; otherwise the dense policy, with "
                    "the reason. Trials stored without intervals are judged on their point values (and flagged). "
                    "Standard output is a policy file for --policy (with --explain --json: the verdict as JSON).")
    _common(q)
    q.add_argument("--max-quality-drop", type=nonneg_float("--max-quality-drop"), metavar="D",
                   help="largest allowed quality drop against dense, at the 95%% upper end (default: the study's max_quality_drop)")
    q.add_argument("--objective", choices=["speedup", "skip_ratio", "tokens_per_s"], default="speedup",
                   help="what to maximise among the trials that qualify (default: the measured speed-up)")
    q.add_argument("--explain", action="store_true",
                   help="print the verdict (policy, reason, quality drop and speed-up with their 95%% intervals, n) "
                        "instead of the bare policy; with --json as one JSON object")
    q.add_argument("--out", metavar="FILE.json", help="also write the policy to this file")
    q.set_defaults(func=cmd_best)

    q = rs.add_parser("export", help="a study's trials as CSV or JSON")
    _common(q)
    q.add_argument("--format", choices=["csv", "json"], default="csv")
    q.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    q.set_defaults(func=cmd_export)

    q = rs.add_parser("plot", help="quality against skip ratio, Pareto front highlighted")
    _common(q)
    q.add_argument("--out", required=True, metavar="F.png")
    q.set_defaults(func=cmd_plot)


def _open(args):
    from .store import Store, StoreError

    try:
        return Store(args.db, must_exist=True)
    except StoreError as exc:
        raise CLIError(str(exc)) from None


def _view(args):
    from .results import load_view
    from .store import StoreError

    store = _open(args)
    try:
        return load_view(store, args.study)
    except StoreError as exc:
        raise CLIError(str(exc)) from None
    finally:
        store.close()


def cmd_studies(args) -> int:
    from .results import format_table

    store = _open(args)
    try:
        summaries = store.list_studies()
        baselines = {s.study.id: store.get_baseline(s.study.id) for s in summaries}
    finally:
        store.close()
    rows = []
    for s in summaries:
        b = baselines[s.study.id]
        rows.append({
            "id": s.study.id, "name": s.study.name, "model": s.study.model, "task": s.study.task,
            "completed": s.counts.get("completed", 0), "pruned": s.counts.get("pruned", 0),
            "failed": s.counts.get("failed", 0), "running": s.counts.get("running", 0),
            "dense_quality": b.quality if b else None,
            "created_at": s.study.created_at.isoformat(timespec="seconds"),
        })
    if args.json:
        print(json.dumps(rows))
    elif rows:
        print(format_table(rows, list(rows[0])))
    else:
        print("no studies yet")
    return 0


def cmd_trials(args) -> int:
    from .results import sort_rows, trial_row, trials_table

    view = _view(args)
    rows = [trial_row(t, view.max_quality_drop) for t in view.trials if not args.status or t.status == args.status]
    try:
        rows = sort_rows(rows, args.sort, dict(zip(view.objectives, view.directions)))
    except KeyError:
        raise CLIError(f"--sort: unknown column '{args.sort}'; use one of {', '.join(rows[0])}") from None
    if args.json:
        print(json.dumps(rows))
        return 0
    from .results import baseline_line

    print(baseline_line(view))
    print(trials_table(rows) if rows else "no trials")
    for r in rows:
        if r["status"] == "failed":
            print(f"trial {r['id']} failed: {r['error']}")
        elif r["status"] == "pruned":
            print(f"trial {r['id']} stopped early: {r['stop_reason']}")
    return 0


def cmd_pareto(args) -> int:
    from .results import baseline_line, trial_row, trials_table

    view = _view(args)
    front = sorted(view.pareto(), key=lambda t: (-(t.speedup or 0.0), t.id))
    rows = [trial_row(t, view.max_quality_drop) for t in front]
    if args.json:
        print(json.dumps({"objectives": view.objectives, "directions": view.directions,
                          "trials": [{**r, "policy": t.policy} for r, t in zip(rows, front)]}))
        return 0
    print(baseline_line(view))
    print(f"Pareto front of '{view.study.name}' "
          f"({', '.join(f'{o} {d}' for o, d in zip(view.objectives, view.directions))}):")
    print(trials_table(rows) if rows else "(no completed trial)")
    return 0


def cmd_best(args) -> int:
    from .results import explain, explain_text, policy_json, verdict_lines, verdict_policy

    view = _view(args)
    verdict = view.recommend(args.max_quality_drop, args.objective)
    text = policy_json(verdict_policy(verdict))
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.explain:
        print(json.dumps(explain(view, verdict), indent=2) if args.json else explain_text(view, verdict))
        return 0
    for line in verdict_lines(view, verdict)[1:]:
        print(f"# {line.strip()}", file=sys.stderr)
    print(text)
    return 0


def cmd_export(args) -> int:
    from .results import export_csv, export_json

    view = _view(args)
    fmt = "json" if args.json else args.format
    text = export_json(view) if fmt == "json" else export_csv(view)
    if args.out:
        Path(args.out).write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {len(view.trials)} trials to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_plot(args) -> int:
    from .results import plot

    view = _view(args)
    info = plot(view, args.out)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"plot of {info['trials']} completed trials written to {args.out} "
              f"(Pareto front: trials {', '.join(map(str, info['pareto'])) or '-'})")
    return 0


# ------------------------------------------------------------------------------ python -m tuning
def main(argv: list[str] | None = None) -> int:
    from ffnskip.cli import run_entry_point

    parser = argparse.ArgumentParser(prog="python -m tuning", description="Run or resume an ffnskip tuning study.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_tune_args(parser)
    args = parser.parse_args(argv)
    return run_entry_point("tuning", cmd_tune, args, extra="tune")
