"""Optional LLM judge (off by default): any OpenAI-compatible chat-completions endpoint.

Templates come from the shared data directory (never from this code):

* ``conversation``: MT-Bench single-answer grading, 1-10. Turn 1 with ``single-v1`` (or
  ``single-math-v1`` with the reference answer when the question has one), turn 2 with
  ``single-v1-multi-turn`` (``single-math-v1-multi-turn``); a conversation's score is the mean of
  its two turns. Dense and policy answers are graded the same way.
* ``summarization``: the LLM-KICK pairwise template of the story's bucket: Assistant 1 is the
  dense summary, Assistant 2 the policy's; four lines of two scores (coherence, consistency,
  fluency, relevance), each side's score is the mean of its four.

A judgement that cannot be parsed is counted (``judge_unparseable``) and left out of the mean;
a failed HTTP call is counted (``judge_errors``). Nothing is dropped silently. The API key is
read from ``$FFNSKIP_JUDGE_API_KEY`` (optional for local servers).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from . import metrics
from .progress import _bar
from .report import RunResult
from .tasks import EvalError, Sample, Task

log = logging.getLogger(__name__)

ENV_JUDGE_KEY = "FFNSKIP_JUDGE_API_KEY"

__all__ = ["ENV_JUDGE_KEY", "Judge", "JudgeConfig", "JudgeError", "JudgeResult", "parse_pair_scores", "parse_rating"]


class JudgeError(EvalError):
    """The judge is misconfigured or unreachable (one line for the user)."""


@dataclass
class JudgeConfig:
    """Where the judge is and how to call it."""

    url: str
    """Base URL of an OpenAI-compatible API (``http://host:port/v1``), or the full
    ``.../chat/completions`` URL."""
    model: str
    """Model name sent in the request (``--judge-model``)."""
    api_key: str | None = None
    """Bearer token; ``None`` reads ``$FFNSKIP_JUDGE_API_KEY`` (may be unset for local servers)."""
    timeout: float = 120.0
    """Seconds per HTTP request."""
    retries: int = 2
    """Extra attempts after a failed request (not after an unparseable answer)."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise JudgeError(f"--judge-url must be an http(s) URL; got {self.url!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise JudgeError("--judge-model is required with --judge-url")
        if self.api_key is None:
            self.api_key = os.environ.get(ENV_JUDGE_KEY) or None
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise JudgeError(f"judge timeout must be positive; got {self.timeout!r}")
        if not (isinstance(self.retries, int) and self.retries >= 0):
            raise JudgeError(f"judge retries must be an integer >= 0; got {self.retries!r}")

    @property
    def endpoint(self) -> str:
        u = self.url.rstrip("/")
        return u if u.endswith("/chat/completions") else u + "/chat/completions"


_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+(?:\.\d+)?)\]")
_PAIR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[, ]\s*(\d+(?:\.\d+)?)\s*$")


def parse_rating(text: str) -> float | None:
    """MT-Bench ``[[rating]]`` (FastChat's backup ``[rating]`` too), 1-10; None if absent."""
    for pattern in (_RATING, _RATING_BACKUP):
        m = pattern.search(text or "")
        if m:
            v = float(m.group(1))
            return v if 1 <= v <= 10 else None
    return None


def parse_pair_scores(text: str, lines: int = 4) -> tuple[float, float] | None:
    """LLM-KICK summary judgement: the first ``lines`` lines of two scores -> (mean 1, mean 2)."""
    pairs = []
    for line in (text or "").splitlines():
        m = _PAIR.match(line)
        if m:
            pairs.append((float(m.group(1)), float(m.group(2))))
            if len(pairs) == lines:
                break
    if len(pairs) < lines or any(not (1 <= a <= 10 and 1 <= b <= 10) for a, b in pairs):
        return None
    return sum(a for a, _ in pairs) / lines, sum(b for _, b in pairs) / lines


@dataclass
class JudgeStats:
    calls: int = 0
    errors: int = 0
    unparseable: int = 0
    unparseable_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"calls": self.calls, "errors": self.errors, "unparseable": self.unparseable,
                "unparseable_examples": self.unparseable_examples[:3]}


class Judge:
    """Scores answers with the shared judge templates through an OpenAI-compatible endpoint."""

    def __init__(self, config: JudgeConfig, templates: dict[str, dict]):
        self.config = config
        self.templates = templates
        self.stats = JudgeStats()
        self._successes = 0
        for name in ("single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"):
            if name not in templates:
                raise JudgeError(f"judge template '{name}' is missing from the data directory")

    # ------------------------------------------------------------------ HTTP
    def chat(self, system: str, user: str, temperature: float, max_tokens: int) -> str | None:
        """One chat completion; None (counted in ``errors``) when every attempt failed."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        body = json.dumps(
            {"model": self.config.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        self.stats.calls += 1
        last = ""
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(min(8.0, 0.5 * 2**attempt))
            req = urllib.request.Request(self.config.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.config.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                content = payload["choices"][0]["message"]["content"]
                self._successes += 1
                return content if isinstance(content, str) else ""
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code in (400, 401, 403, 404):
                    break  # will not get better by retrying
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                last = str(getattr(exc, "reason", exc))
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"malformed response: {exc}"
        self.stats.errors += 1
        log.warning("judge call failed: %s", last)
        if self._successes == 0 and self.stats.errors >= 3:
            raise JudgeError(f"the judge at {self.config.endpoint} failed 3 times and never answered ({last})")
        return None

    def _unparseable(self, text: str) -> None:
        self.stats.unparseable += 1
        self.stats.unparseable_examples.append((text or "")[:200])

    # ------------------------------------------------------------------ MT-Bench
    def _single(self, name: str, **kwargs) -> float | None:
        t = self.templates[name]
        text = self.chat(t.get("system_prompt", ""), t["prompt_template"].format(**kwargs), 0.0, 2048)
        if text is None:
            return None
        score = parse_rating(text)
        if score is None:
            self._unparseable(text)
        return score

    def score_conversation(self, turns: list[str], answers: list[str], reference: list[str] | None) -> dict:
        """MT-Bench scores of one two-turn conversation: ``{"turn1", "turn2", "score"}``."""
        q1, q2 = turns[0], turns[1] if len(turns) > 1 else ""
        a1, a2 = answers[0], answers[1] if len(answers) > 1 else ""
        if reference:
            r1, r2 = reference[0], reference[1] if len(reference) > 1 else ""
            s1 = self._single("single-math-v1", question=q1, answer=a1, ref_answer_1=r1)
            s2 = (self._single("single-math-v1-multi-turn", question_1=q1, question_2=q2, answer_1=a1, answer_2=a2,
                               ref_answer_1=r1, ref_answer_2=r2) if len(turns) > 1 else None)
        else:
            s1 = self._single("single-v1", question=q1, answer=a1)
            s2 = (self._single("single-v1-multi-turn", question_1=q1, question_2=q2, answer_1=a1, answer_2=a2)
                  if len(turns) > 1 else None)
        vals = [s for s in (s1, s2) if s is not None]
        return {"turn1": s1, "turn2": s2, "score": sum(vals) / len(vals) if vals else None}

    # ------------------------------------------------------------------ summaries
    def score_summary_pair(self, bucket: str, article: str, dense: str, policy: str) -> tuple[float | None, float | None]:
        """LLM-KICK pairwise judgement: (dense score, policy score), each 1-10 or None."""
        t = self.templates.get(f"summary-{bucket}") or self.templates.get("summary-small")
        if t is None:
            raise JudgeError("the summarization judge template (cnn_dailymail_llmkick/json_utils/prompt.jsonl) is missing")
        user = t["prompt_template"].format(question=article, answer_1=dense, answer_2=policy,
                                           prompt=t["defaults"]["prompt"])
        text = self.chat(t.get("system_prompt", ""), user, float(t.get("temperature", 0.2)), int(t.get("max_tokens", 1024)))
        if text is None:
            return None, None
        pair = parse_pair_scores(text)
        if pair is None:
            self._unparseable(text)
            return None, None
        return pair


# ---------------------------------------------------------------------- the judge in an evaluation
@dataclass
class JudgeResult:
    """What :func:`run_judge` scored: per sample and per side."""

    info: dict
    """The report's ``judge`` object (endpoint, model, call counts, templates)."""
    dense_scores: list[float | None]
    """Per sample, the dense output's score (``None``: not parseable or the call failed)."""
    skip_scores: list[float | None]
    """Per sample, the policy output's score."""
    dense: dict = field(default_factory=dict)
    """The dense side's ``judge_score`` (mean), ``judge_n``, ``judge_unparseable``, ``judge_errors``."""
    skip: dict = field(default_factory=dict)
    """The same for the policy."""

    def add_to(self, run: RunResult) -> None:
        """Add the scores to the run's per-sample records and its aggregates."""
        for rec, d, p in zip(run.samples, self.dense_scores, self.skip_scores):
            rec["dense_scores"]["judge_score"] = d
            rec["scores"]["judge_score"] = p
        run.dense.update(self.dense)
        run.skip.update(self.skip)


def run_judge(config: JudgeConfig, task: Task, samples: list[Sample], run: RunResult, data_dir, progress) -> JudgeResult:
    """Judge every sample's dense and policy outputs of ``run`` (conversation: each graded on its
    own; summarization: one pairwise judgement scores both)."""
    from .. import data as _data

    judge = Judge(config, _data.judge_prompts(data_dir))
    scores: dict[str, list] = {"dense": [], "skip": []}
    bad = {"dense": 0, "skip": 0}
    failed = {"dense": 0, "skip": 0}

    def judged(side: str, call):
        u0, e0 = judge.stats.unparseable, judge.stats.errors
        value = call()
        bad[side] += judge.stats.unparseable - u0
        failed[side] += judge.stats.errors - e0
        return value

    with _bar(len(samples), f"{task.name}: judge", progress) as bar:
        for i, s in enumerate(samples):
            rec = run.samples[i]
            if task.name == "summarization":
                # One pairwise judgement scores both sides; a bad one counts for both.
                d, p = judged("skip", lambda: judge.score_summary_pair(
                    s.meta.get("bucket", "small"), s.input, rec["dense_output"], rec["output"]))
            else:
                d = judged("dense", lambda: judge.score_conversation(s.input, rec["dense_output"], s.reference)["score"])
                p = judged("skip", lambda: judge.score_conversation(s.input, rec["output"], s.reference)["score"])
            scores["dense"].append(d)
            scores["skip"].append(p)
            bar.update(1)
    if task.name == "summarization":
        bad["dense"], failed["dense"] = bad["skip"], failed["skip"]
    sides = {
        side: {
            "judge_score": metrics.mean(scores[side]),
            "judge_n": sum(1 for v in scores[side] if v is not None),
            "judge_unparseable": bad[side],
            "judge_errors": failed[side],
        }
        for side in ("dense", "skip")
    }
    info = {"url": config.endpoint, "model": config.model, **judge.stats.to_dict()}
    info["templates"] = ("LLM-KICK summary pairwise (dense = Assistant 1)" if task.name == "summarization"
                         else "MT-Bench single-v1 / single-math-v1 (+ multi-turn)")
    return JudgeResult(info, scores["dense"], scores["skip"], sides["dense"], sides["skip"])
