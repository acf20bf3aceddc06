"""Where the evaluation data lives: a configurable data directory.

Order: an explicit ``--data-dir``, then ``$FFNSKIP_DATA_DIR``, then ``../shared/data`` next to the
repository (or next to the current directory) when it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import FFNSkipError

ENV_DATA_DIR = "FFNSKIP_DATA_DIR"


class DataError(FFNSkipError, ValueError):
    """Missing or malformed data (one clear line for the user)."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (--data-dir)")
        return p
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"data directory {p} does not exist (${ENV_DATA_DIR})")
        return p
    candidates = [
        Path(__file__).resolve().parents[1].parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(
        f"no data directory found: pass --data-dir or set ${ENV_DATA_DIR} "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def data_file(relative: str, explicit_dir: str | os.PathLike | None = None) -> Path:
    p = data_dir(explicit_dir) / relative
    if not p.is_file():
        raise DataError(f"data file {p} is missing")
    return p


def wikitext2_text(explicit_dir: str | os.PathLike | None = None) -> str:
    """WikiText-2 raw test split as the usual joined string (CRLF normalised), via `datasets`."""
    import datasets

    path = data_file("wikitext2/wikitext-2-raw-v1.test.joined.crlf.txt", explicit_dir)
    ds = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
    return ds[0]["text"].replace("\r\n", "\n")


# ---------------------------------------------------------------------- evaluation data sets
# Loaders of the shared data sets (see each SOURCE.md), all read through `datasets`. They return
# plain Python records; ffnskip.eval.tasks turns them into samples and prompts.

FREEBASEQA_EVAL = "freebaseqa/FreebaseQA-eval.txt"
FREEBASEQA_DEV = "freebaseqa/FreebaseQA-dev.txt"
CNNDM_INDEX = "cnn_dailymail_llmkick/question_id_to_story.tsv"
MT_BENCH_QUESTIONS = "mt_bench/question.jsonl"
MT_BENCH_REFERENCES = "mt_bench/reference_answer/gpt-4.jsonl"
MT_BENCH_JUDGE_PROMPTS = "mt_bench/judge_prompts.jsonl"
CNNDM_JUDGE_PROMPTS = "cnn_dailymail_llmkick/json_utils/prompt.jsonl"
CNNDM_REVIEWERS = "cnn_dailymail_llmkick/json_utils/reviewer.jsonl"


_MEMO: dict[tuple, object] = {}


def _memo(kind: str, paths: list[Path], build):
    """Parsed shared data, kept per process and keyed by the files' paths, sizes and mtimes, so
    repeated evaluations (a tuning run) do not re-read them. Callers get a deep copy."""
    import copy

    key = (kind, *((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))
    if key not in _MEMO:
        _MEMO[key] = build()
    return copy.deepcopy(_MEMO[key])


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    return datasets


def _load(builder: str, path: Path, label: str = "", **kwargs):
    import logging

    datasets = _quiet_datasets()
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    ds_logger.setLevel(logging.CRITICAL)  # parse errors become one DataError line, not log spam
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets wraps parse errors in several exception types
        cause = exc.__cause__ or exc.__context__ or exc
        detail = " ".join(str(cause).split())[:200] or type(cause).__name__
        raise DataError(f"{label}cannot parse {path} as {builder.upper()}: {detail}") from None
    finally:
        ds_logger.setLevel(level)


def _unquote_csv_field(text: str) -> str:
    """FreebaseQA keeps a few CSV-quoted questions (``"... ""x"" ..."``): unquote them."""
    t = text.strip()
    if len(t) >= 2 and t[0] == '"' and t[-1] == '"':
        t = t[1:-1].replace('""', '"')
    return t


def freebaseqa(explicit_dir: str | os.PathLike | None = None, split: str = "eval") -> list[dict]:
    """FreebaseQA ``eval`` (or ``dev``) as ``[{"question", "answers": [..]}]``, one record per
    unique question in file order; the lines of one question form its answer set (SOURCE.md)."""
    if split not in ("eval", "dev"):
        raise DataError(f"FreebaseQA split must be eval or dev; got {split!r}")
    path = data_file(FREEBASEQA_EVAL if split == "eval" else FREEBASEQA_DEV, explicit_dir)
    return _memo("freebaseqa", [path], lambda: _read_freebaseqa(path))


def _read_freebaseqa(path: Path) -> list[dict]:
    ds = _load("csv", path, sep="|", header=None, names=["question", "answer"], quoting=3,
               keep_default_na=False)
    order: dict[str, dict] = {}
    for row in ds:
        q = _unquote_csv_field(str(row["question"]))
        a = str(row["answer"]).strip()
        if not q or not a:
            continue
        rec = order.setdefault(q, {"question": q, "answers": []})
        if a not in rec["answers"]:
            rec["answers"].append(a)
    if not order:
        raise DataError(f"{path} holds no question")
    return list(order.values())


def split_story(text: str) -> tuple[str, list[str]]:
    """A CNN/DM ``.story`` file -> (article before the first ``@highlight``, highlight sentences)."""
    head, sep, tail = text.partition("@highlight")
    article = "\n\n".join(p.strip() for p in head.strip().split("\n\n") if p.strip())
    highlights = []
    if sep:
        for chunk in ("@highlight" + tail).split("@highlight"):
            line = " ".join(chunk.split())
            if line:
                highlights.append(line)
    return article, highlights


def cnndm_stories(explicit_dir: str | os.PathLike | None = None) -> list[dict]:
    """The 90 LLM-KICK summarization items in question_id order:
    ``[{"question_id", "bucket", "story_file", "article", "highlights": [..]}]``."""
    index = data_file(CNNDM_INDEX, explicit_dir)
    return _memo("cnndm", [index], lambda: _read_cnndm(index))


def _read_cnndm(index: Path) -> list[dict]:
    root = index.parent
    rows = list(_load("csv", index, sep="\t"))
    paths = [root / str(row["story_file"]) for row in rows]
    for p in paths:
        if not p.is_file():
            raise DataError(f"story file {p} (listed in {index}) is missing")
    # One `datasets` build for all stories: one row per file, in data_files order.
    texts = _quiet_datasets().load_dataset(
        "text", data_files=[str(p) for p in paths], sample_by="document", split="train"
    )["text"]
    if len(texts) != len(paths):
        raise DataError(f"read {len(texts)} stories for the {len(paths)} rows of {index}")
    out = []
    for row, story_path, text in zip(rows, paths, texts):
        article, highlights = split_story(text)
        if not article or not highlights:
            raise DataError(f"{story_path} has no article or no @highlight")
        out.append(
            {
                "question_id": int(row["question_id"]),
                "bucket": str(row["category"]),
                "story_file": str(row["story_file"]),
                "article": article,
                "highlights": highlights,
            }
        )
    out.sort(key=lambda r: r["question_id"])
    return out


def mt_bench_questions(explicit_dir: str | os.PathLike | None = None) -> list[dict]:
    """MT-Bench: ``[{"question_id", "category", "turns": [q1, q2], "reference": [r1, r2] | None}]``;
    ``reference`` comes from the GPT-4 reference answers when there is one (math, reasoning,
    coding), else from the question file's own short references, else None."""
    qpath = data_file(MT_BENCH_QUESTIONS, explicit_dir)
    try:
        rpath = data_file(MT_BENCH_REFERENCES, explicit_dir)
    except DataError:
        rpath = None
    return _memo("mt_bench", [qpath] + ([rpath] if rpath else []), lambda: _read_mt_bench(qpath, rpath))


def _read_mt_bench(qpath: Path, rpath: Path | None) -> list[dict]:
    ds = _load("json", qpath)
    refs = {}
    if rpath is not None:
        for row in _load("json", rpath):
            refs[int(row["question_id"])] = list(row["choices"][0]["turns"])
    out = []
    for row in ds:
        qid = int(row["question_id"])
        ref = refs.get(qid) or (list(row["reference"]) if row.get("reference") else None)
        out.append({"question_id": qid, "category": row["category"], "turns": list(row["turns"]), "reference": ref})
    return out


def judge_prompts(explicit_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """Judge templates: MT-Bench's by name (``single-v1``, ...) and the LLM-KICK summarization
    templates as ``summary-<bucket>`` (with ``temperature`` / ``max_tokens`` of its reviewer)."""
    out: dict[str, dict] = {}
    for row in _load("json", data_file(MT_BENCH_JUDGE_PROMPTS, explicit_dir)):
        out[row["name"]] = dict(row)
    reviewers = {}
    try:
        for row in _load("json", data_file(CNNDM_REVIEWERS, explicit_dir)):
            reviewers[int(row["prompt_id"])] = dict(row["metadata"])
    except DataError:
        pass
    for row in _load("json", data_file(CNNDM_JUDGE_PROMPTS, explicit_dir)):
        rec = dict(row)
        rec.update(reviewers.get(int(row["prompt_id"]), {}))
        out[f"summary-{row['category']}"] = rec
    return out


# ---------------------------------------------------------------------- user files
def load_records(path: str | os.PathLike, columns: dict[str, str], required: tuple[str, ...]) -> list[dict]:
    """Rows of a user's JSONL / JSON array / CSV file, as ``{canonical_name: value}``.

    ``columns`` maps each canonical field (``question``, ``answer``, ...) to the column holding
    it; the columns of ``required`` fields must exist and be non-empty in every row.
    Errors are :class:`DataError` with one line naming the file, the row and the field.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"--data: file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson", ".csv", ".tsv") and not p.read_bytes().strip():
        raise DataError(f"--data: {p} is empty")
    if suffix in (".jsonl", ".json", ".ndjson"):
        ds = _load("json", p, "--data: ")
    elif suffix in (".csv", ".tsv"):
        ds = _load("csv", p, "--data: ", sep="\t" if suffix == ".tsv" else ",", keep_default_na=False)
    else:
        raise DataError(f"--data: {p} must be a .jsonl, .json (array) or .csv file")
    if ds.num_rows == 0:
        raise DataError(f"--data: {p} holds no rows")
    present = set(ds.column_names)
    for canon, col in columns.items():
        if canon in required and col not in present:
            mapped = f" (mapped with --field {canon}={col})" if col != canon else ""
            raise DataError(
                f"--data: {p} has no field '{col}'{mapped}; its fields are {', '.join(sorted(present))}"
            )
    out = []
    for i, row in enumerate(ds):
        rec = {}
        for canon, col in columns.items():
            value = row.get(col)
            if isinstance(value, str):
                value = value.strip()
            if canon in required and (value is None or value == "" or value == []):
                raise DataError(f"--data: {p} row {i + 1}: field '{col}' is empty")
            rec[canon] = value
        out.append(rec)
    return out
