"""The evaluation tasks (method.md §5): data, prompts, per-sample scoring, aggregation.

A :class:`Task` knows where its samples come from (the shared data directory or a user's
``--data`` file), how to turn a sample into a prompt, and how to score an output. The decoding
itself (dense and policy, fidelity, speed) is the same for every task and lives in
:mod:`ffnskip.eval`.

Tasks (``TASKS``):

* ``factoid_qa``: FreebaseQA eval, method.md's prompt, greedy, 24 new tokens (no stop string);
  ``accuracy`` (substring rule on the generated text only) and ``exact_match`` (first line).
  ``factoid_qa_dev`` is the same on the dev split (tune there, report on eval).
* ``summarization``: the 90 LLM-KICK CNN/DM stories (small / mid / large); ROUGE-1/2/L against
  the highlights, per bucket and overall.
* ``conversation``: the 80 MT-Bench questions, two turns in one conversation; no reference
  metric (fidelity to dense, and the optional judge).
* ``perplexity``: WikiText-2 raw test in windows, decoded token by token with teacher forcing.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from .. import data as _data
from . import metrics

__all__ = ["EvalError", "Sample", "Task", "TASKS", "get_task", "parse_field_mappings"]


class EvalError(_data.DataError):
    """A user error in an evaluation request (unknown task, bad field mapping, bad limit...)."""


@dataclass
class Sample:
    """One evaluation item."""

    index: int
    """Position in the task's full data set (stable across ``--limit`` / ``--seed`` choices)."""
    id: str
    """Stable identifier, e.g. ``freebaseqa-eval:17`` or ``mt_bench:81``."""
    input: Any
    """Question (str), article (str), turns (list of str) or a token window (list of int)."""
    reference: Any = None
    """Gold answers (list of str), reference summary (str), reference turns or None."""
    meta: dict = field(default_factory=dict)

    def fingerprint_record(self) -> dict:
        return {"id": self.id, "input": self.input, "reference": self.reference}


def fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 of the selected samples (ids, inputs and references, in order)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps(s.fingerprint_record(), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def parse_field_mappings(items: Sequence[str] | dict[str, str] | None, task: "Task") -> dict[str, str]:
    """``["answer=gold", ...]`` (or a dict) -> ``{canonical: column}`` for every field of ``task``."""
    mapping = {name: name for name in task.fields}
    if not items:
        return mapping
    pairs = items.items() if isinstance(items, dict) else []
    if not isinstance(items, dict):
        parsed = []
        for item in items:
            name, sep, column = str(item).partition("=")
            if not sep or not name.strip() or not column.strip():
                raise EvalError(f"--field must look like NAME=COLUMN (e.g. answer=gold); got {item!r}")
            parsed.append((name.strip(), column.strip()))
        pairs = parsed
    for name, column in pairs:
        if name not in task.fields:
            raise EvalError(
                f"--field {name}={column}: task {task.name} has no field '{name}'; "
                f"its fields are {', '.join(task.fields)}"
            )
        mapping[name] = column
    return mapping


def _as_list_of_str(value: Any, where: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        out = [str(v).strip() for v in value if v is not None and str(v).strip()]
    elif isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:  # a JSON list inside a CSV cell
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        out = _as_list_of_str(parsed, where) if isinstance(parsed, list) else [value.strip()]
    elif value is None:
        out = []
    else:
        out = [str(value).strip()]
    if not out:
        raise EvalError(f"{where} is empty")
    return out


class Task:
    """Base class: subclasses set the class attributes and implement ``_load_default`` /
    ``_load_user`` / ``prompt`` / ``score``."""

    name: str = ""
    description: str = ""
    kind: str = "generate"
    """``generate`` (one prompt, one output), ``conversation`` (two turns) or ``perplexity``."""
    primary: str = ""
    higher_is_better: bool = True
    fields: tuple[str, ...] = ()
    """Canonical field names of a user ``--data`` file."""
    required: tuple[str, ...] = ()
    default_max_new_tokens: int = 64
    default_chat: bool = False
    stop: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = ()
    default_limit: int | None = None

    # ------------------------------------------------------------------ data
    def load(
        self,
        *,
        data_dir=None,
        data_file=None,
        fields: Sequence[str] | dict[str, str] | None = None,
        tokenizer=None,
        limit: int | None = None,
        seed: int = 0,
        max_new_tokens: int | None = None,
    ) -> list[Sample]:
        """The selected samples: all of them, or a deterministic subset of ``limit``."""
        if data_file is not None:
            mapping = parse_field_mappings(fields, self)
            rows = _data.load_records(data_file, mapping, self.required)
            samples = self._from_user(rows, str(data_file))
        else:
            if fields:
                raise EvalError("--field only applies to a --data file")
            samples = self._load_default(data_dir)
        return self.select(samples, limit, seed)

    def select(self, samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
        """``limit`` samples drawn with ``random.Random(seed)``, kept in data-set order."""
        if limit is None or limit >= len(samples):
            return list(samples)
        rng = random.Random(seed)
        chosen = sorted(rng.sample(range(len(samples)), limit))
        return [samples[i] for i in chosen]

    def _load_default(self, data_dir) -> list[Sample]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _from_user(self, rows: list[dict], source: str) -> list[Sample]:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ prompts and scores
    def prompt(self, sample: Sample, chat: bool) -> str | list[dict[str, str]]:  # pragma: no cover
        raise NotImplementedError

    def score(self, output: str, sample: Sample) -> dict[str, float]:
        return {}

    def aggregate(self, samples: Sequence[Sample], scores: Sequence[dict[str, float]]) -> dict[str, Any]:
        """Mean of every task metric over the samples."""
        return {name: metrics.mean(s.get(name) for s in scores) for name in self.metric_names}


# ---------------------------------------------------------------------- factoid QA
FACTOID_PROMPT = "Please give answer to this question: {question}\nThe answer is "


class FactoidQA(Task):
    name = "factoid_qa"
    description = "FreebaseQA eval: greedy answer, gold answer must appear in the generated text"
    primary = "accuracy"
    fields = ("question", "answer")
    required = ("question", "answer")
    default_max_new_tokens = 24
    # No stop string: every output runs to max_new_tokens (or EOS), so dense and every policy
    # decode outputs of the same length and their skip ratios compare directly.
    # ``exact_match`` reads the first non-empty line; ``accuracy`` the whole output.
    stop: tuple[str, ...] = ()
    metric_names = ("accuracy", "exact_match")
    split = "eval"

    def _load_default(self, data_dir) -> list[Sample]:
        recs = _data.freebaseqa(data_dir, self.split)
        return [
            Sample(i, f"freebaseqa-{self.split}:{i}", r["question"], list(r["answers"])) for i, r in enumerate(recs)
        ]

    def _from_user(self, rows, source) -> list[Sample]:
        out = []
        for i, r in enumerate(rows):
            answers = _as_list_of_str(r["answer"], f"--data: {source} row {i + 1}: field 'answer'")
            out.append(Sample(i, f"user:{i}", str(r["question"]).strip(), answers))
        return out

    def prompt(self, sample, chat):
        if chat:
            return [{"role": "user", "content": FACTOID_PROMPT.format(question=sample.input).rstrip()}]
        return FACTOID_PROMPT.format(question=sample.input)

    def score(self, output, sample):
        return {
            "accuracy": float(metrics.substring_match(output, sample.reference)),
            "exact_match": float(metrics.exact_match(output, sample.reference)),
        }


class FactoidQADev(FactoidQA):
    name = "factoid_qa_dev"
    description = "FreebaseQA dev (for tuning and calibration; report on factoid_qa)"
    split = "dev"


# ---------------------------------------------------------------------- summarization
SUMMARY_PROMPT = (
    "Summarize the given story in less than 150 words while preserving high coherence, "
    "consistency, fluency, and relevance.\n\n{article}"
)
BUCKETS = ("small", "mid", "large")


class Summarization(Task):
    name = "summarization"
    description = "LLM-KICK CNN/DM stories (small / mid / large): ROUGE-1/2/L against the highlights"
    primary = "rouge_l"
    fields = ("article", "summary", "bucket")
    required = ("article", "summary")
    default_max_new_tokens = 200
    default_chat = True
    metric_names = ("rouge1", "rouge2", "rouge_l")

    def _load_default(self, data_dir) -> list[Sample]:
        out = []
        for i, r in enumerate(_data.cnndm_stories(data_dir)):
            out.append(
                Sample(
                    i,
                    f"cnndm-llmkick:{r['question_id']}",
                    r["article"],
                    "\n".join(r["highlights"]),
                    {"bucket": r["bucket"], "story_file": r["story_file"]},
                )
            )
        return out

    def _from_user(self, rows, source) -> list[Sample]:
        out = []
        for i, r in enumerate(rows):
            summary = r["summary"]
            if isinstance(summary, (list, tuple)):
                summary = "\n".join(str(s) for s in summary)
            meta = {"bucket": str(r["bucket"])} if r.get("bucket") else {}
            out.append(Sample(i, f"user:{i}", str(r["article"]).strip(), str(summary).strip(), meta))
        return out

    def select(self, samples, limit, seed):
        """Stratified by bucket: the buckets take turns, each in a seeded random order."""
        if limit is None or limit >= len(samples):
            return list(samples)
        rng = random.Random(seed)
        groups: dict[str, list[Sample]] = {}
        for s in samples:
            groups.setdefault(s.meta.get("bucket", ""), []).append(s)
        for g in groups.values():
            rng.shuffle(g)
        chosen: list[Sample] = []
        order = sorted(groups, key=lambda b: BUCKETS.index(b) if b in BUCKETS else len(BUCKETS))
        while len(chosen) < limit:
            for b in order:
                if groups[b] and len(chosen) < limit:
                    chosen.append(groups[b].pop())
        return sorted(chosen, key=lambda s: s.index)

    def prompt(self, sample, chat):
        text = SUMMARY_PROMPT.format(article=sample.input)
        return [{"role": "user", "content": text}] if chat else text

    def score(self, output, sample):
        return metrics.rouge(output, sample.reference)

    def aggregate(self, samples, scores):
        out = super().aggregate(samples, scores)
        by_bucket: dict[str, dict[str, float | None]] = {}
        buckets = sorted({s.meta.get("bucket") for s in samples if s.meta.get("bucket")},
                         key=lambda b: BUCKETS.index(b) if b in BUCKETS else len(BUCKETS))
        for b in buckets:
            sel = [sc for s, sc in zip(samples, scores) if s.meta.get("bucket") == b]
            by_bucket[b] = {name: metrics.mean(sc.get(name) for sc in sel) for name in self.metric_names}
            by_bucket[b]["n"] = len(sel)
        if by_bucket:
            out["by_bucket"] = by_bucket
        return out


# ---------------------------------------------------------------------- conversation
class Conversation(Task):
    name = "conversation"
    description = "MT-Bench: 80 two-turn questions, the second asked after the model's own first answer"
    kind = "conversation"
    primary = "rouge_l_vs_dense"  # "judge_score" when a judge is configured
    fields = ("question", "reference", "category")
    required = ("question",)
    default_max_new_tokens = 256
    default_chat = True

    def _load_default(self, data_dir) -> list[Sample]:
        return [
            Sample(i, f"mt_bench:{r['question_id']}", list(r["turns"]), r["reference"], {"category": r["category"]})
            for i, r in enumerate(_data.mt_bench_questions(data_dir))
        ]

    def _from_user(self, rows, source) -> list[Sample]:
        out = []
        for i, r in enumerate(rows):
            turns = _as_list_of_str(r["question"], f"--data: {source} row {i + 1}: field 'question'")
            ref = r.get("reference")
            ref = _as_list_of_str(ref, "reference") if ref not in (None, "", []) else None
            meta = {"category": str(r["category"])} if r.get("category") else {}
            out.append(Sample(i, f"user:{i}", turns, ref, meta))
        return out

    def messages(self, sample: Sample, answers: Sequence[str]) -> list[dict[str, str]]:
        """The conversation up to the next user turn: q1, a1, q2, ... (len(answers) + 1 user turns)."""
        msgs: list[dict[str, str]] = []
        for i, q in enumerate(sample.input[: len(answers) + 1]):
            msgs.append({"role": "user", "content": q})
            if i < len(answers):
                msgs.append({"role": "assistant", "content": answers[i]})
        return msgs

    def prompt(self, sample, chat, answers: Sequence[str] = ()):
        msgs = self.messages(sample, answers)
        if chat:
            return msgs
        parts = []
        for m in msgs:
            parts.append(f"### {'User' if m['role'] == 'user' else 'Assistant'}:\n{m['content']}\n")
        return "\n".join(parts) + "\n### Assistant:\n"


# ---------------------------------------------------------------------- perplexity
class Perplexity(Task):
    name = "perplexity"
    description = "WikiText-2 raw test, token by token with teacher forcing (--limit counts tokens)"
    kind = "perplexity"
    primary = "perplexity"
    higher_is_better = False
    fields = ("text",)
    required = ("text",)
    default_max_new_tokens = 256  # window length (tokens scored per window)
    default_limit = 1024  # tokens

    def load(self, *, data_dir=None, data_file=None, fields=None, tokenizer=None, limit=None, seed=0,
             max_new_tokens=None) -> list[Sample]:
        if tokenizer is None:
            raise EvalError("the perplexity task needs a tokenizer")
        if data_file is not None:
            mapping = parse_field_mappings(fields, self)
            rows = _data.load_records(data_file, mapping, self.required)
            text = "\n\n".join(str(r["text"]) for r in rows)
            source = "user"
        else:
            if fields:
                raise EvalError("--field only applies to a --data file")
            text = _data.wikitext2_text(data_dir)
            source = "wikitext2-raw-test"
        tokens = limit if limit is not None else self.default_limit
        window = max_new_tokens or self.default_max_new_tokens
        bos = getattr(tokenizer, "bos_token_id", None)
        adds_bos = bos is not None and list(tokenizer("a")["input_ids"])[:1] == [bos]
        # Windows of `window` scored tokens; without a BOS token each window's first token is its
        # prompt (not scored). `tokens` tokens are scored in all.
        n_windows = -(-tokens // window)
        need = tokens + (0 if adds_bos else n_windows)
        chars = max(4096, need * 12)  # about 4 characters per token: generous
        ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        while len(ids) < need and chars < len(text):
            chars *= 2
            ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        if len(ids) < (1 if adds_bos else 2):
            raise EvalError("the perplexity text is too short (fewer than 2 tokens)")
        samples = []
        pos = scored = 0
        while scored < tokens and pos < len(ids) - (0 if adds_bos else 1):
            n = min(window, tokens - scored)
            if adds_bos:
                prompt, cont = [bos], ids[pos : pos + n]
            else:
                prompt, cont = ids[pos : pos + 1], ids[pos + 1 : pos + 1 + n]
            if not cont:
                break
            samples.append(Sample(len(samples), f"{source}:{pos}", {"prompt_ids": prompt, "target_ids": cont}, None,
                                  {"offset": pos}))
            pos += len(cont) + (0 if adds_bos else 1)
            scored += len(cont)
        return samples

    @staticmethod
    def perplexity(total_nll: float, count: int) -> float | None:
        if count <= 0:
            return None
        try:
            return math.exp(total_nll / count)
        except OverflowError:
            return float("inf")


TASKS: dict[str, Task] = {
    t.name: t for t in (FactoidQA(), Summarization(), Conversation(), Perplexity(), FactoidQADev())
}


def get_task(name: str) -> Task:
    task = TASKS.get(name)
    if task is None:
        raise EvalError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return task
