"""Evaluation metrics: factoid answer matching, ROUGE, degeneration, fidelity to dense.

Plain functions on strings and token-id lists, no model needed; the evaluator
(:func:`ffnskip.eval.evaluate`) aggregates them per report.

Normalisations (both documented in ``docs/reproduction.md``):

* :func:`normalize_compact` is method.md §5's factoid rule: lowercase, every whitespace
  character removed. ``accuracy`` is "a compact gold answer is a substring of the compact
  generated text".
* :func:`normalize_answer` is the usual SQuAD normalisation (lowercase, punctuation and the
  articles a/an/the removed, whitespace collapsed). It is used for ``exact_match`` and for
  ``answer_agreement`` (two outputs agree when their normalised texts are equal).
"""

from __future__ import annotations

import math
import re
import string
from functools import lru_cache
from typing import Iterable, Sequence

__all__ = [
    "COLLAPSE_MIN_WORDS",
    "COLLAPSE_REPETITION",
    "answer_agreement",
    "exact_match",
    "first_divergence",
    "is_collapsed",
    "mean",
    "normalize_answer",
    "normalize_compact",
    "repetition",
    "rouge",
    "rouge_l",
    "substring_match",
]

_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WS = re.compile(r"\s+")


def normalize_compact(text: str) -> str:
    """method.md §5: lowercase with every whitespace character removed."""
    return _WS.sub("", str(text).lower())


def normalize_answer(text: str) -> str:
    """SQuAD-style: lowercase, punctuation and articles removed, whitespace collapsed."""
    s = str(text).lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(answers: str | Iterable[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    return [str(a) for a in answers]


def substring_match(prediction: str, answers: str | Iterable[str]) -> bool:
    """True when some compact gold answer is a substring of the compact prediction.

    Empty gold answers never match (they would be a substring of everything).
    """
    pred = normalize_compact(prediction)
    for gold in _golds(answers):
        g = normalize_compact(gold)
        if g and g in pred:
            return True
    return False


def exact_match(prediction: str, answers: str | Iterable[str]) -> bool:
    """True when the prediction's first non-empty line equals a gold answer (SQuAD-normalised)."""
    first = next((line for line in str(prediction).splitlines() if line.strip()), "")
    pred = normalize_answer(first)
    return any(pred == normalize_answer(g) for g in _golds(answers) if normalize_answer(g))


def answer_agreement(a: str, b: str) -> bool:
    """Two outputs agree when their SQuAD-normalised texts are equal (``output_identity``)."""
    return normalize_answer(a) == normalize_answer(b)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def short_answer(text: str) -> str:
    """The short answer of an output: its first non-empty line, cut at the end of its first
    sentence, SQuAD-normalised (``"Paris. It is the capital"`` and ``"Paris!"`` both give
    ``"paris"``)."""
    line = next((ln for ln in str(text).splitlines() if ln.strip()), "")
    first = _SENTENCE_END.split(line.strip(), maxsplit=1)[0]
    return normalize_answer(first)


def answer_agreement_short(a: str, b: str) -> bool:
    """The short answers agree (:func:`short_answer`): a rewording after the answer does not count."""
    return short_answer(a) == short_answer(b)


# ---------------------------------------------------------------------- ROUGE
@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (the ``rouge-score`` package, Porter stemming).

    ``rouge-score`` keeps only ASCII letters and digits as tokens; texts without any such token
    score 0 against everything.
    """
    s = _scorer().score(str(reference), str(prediction))
    return {"rouge1": s["rouge1"].fmeasure, "rouge2": s["rouge2"].fmeasure, "rouge_l": s["rougeL"].fmeasure}


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure; two texts equal after :func:`normalize_answer` score 1 (even when both
    are empty or have no token ``rouge-score`` can read)."""
    if normalize_answer(prediction) == normalize_answer(reference):
        return 1.0
    return _scorer().score(str(reference), str(prediction))["rougeL"].fmeasure


# ---------------------------------------------------------------------- degeneration
#: An output counts as collapsed when it has at least this many words ...
COLLAPSE_MIN_WORDS = 8
#: ... and at least this share of its word 4-grams are repeats, or when a short unit of
#: characters repeats back to back (``_LOOP``), e.g. ``"1000000000000000"``.
COLLAPSE_REPETITION = 0.5
_LOOP = re.compile(r"(.{1,8}?)\1{11,}", re.DOTALL)


def _words(text: str) -> list[str]:
    return str(text).lower().split()


def ngram_counts(items: Sequence, n: int = 4) -> tuple[int, int]:
    """(number of n-grams, number of them that repeat an earlier n-gram of the same sequence)."""
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    if not grams:
        return 0, 0
    return len(grams), len(grams) - len(set(grams))


def repetition(text_or_items: str | Sequence, n: int = 4) -> float:
    """Share of the n-grams (default 4-grams of lowercased words) that repeat an earlier one.

    0 for text with no repeats or fewer than ``n`` words; approaches 1 for a loop.
    """
    items = _words(text_or_items) if isinstance(text_or_items, str) else list(text_or_items)
    total, repeated = ngram_counts(items, n)
    return repeated / total if total else 0.0


def is_collapsed(text: str) -> bool:
    """Generation collapse: a long-enough output that mostly loops (see the constants)."""
    words = _words(text)
    if len(words) >= COLLAPSE_MIN_WORDS and repetition(words) >= COLLAPSE_REPETITION:
        return True
    return bool(_LOOP.search(str(text)))


# ---------------------------------------------------------------------- fidelity
def first_divergence(a: Sequence[int], b: Sequence[int]) -> tuple[int, bool]:
    """Index of the first position where two token sequences differ, and whether they differ.

    Identical sequences return ``(len, False)``; when one is a prefix of the other the index is
    the shorter length.
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i, True
    return n, len(a) != len(b)


def mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None

