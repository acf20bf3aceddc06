"""Evaluation metrics, judge parsing, budget matching and data loading on hand-made inputs
(no model)."""

from __future__ import annotations

import json

import pytest

from ffnskip.baselines import estimate_adaptive_ratio, expected_skip_ratio, matched_budget, shortgpt_layers
from ffnskip.eval import metrics
from ffnskip.eval.judge import parse_pair_scores, parse_rating
from ffnskip.policy import SkipPolicy


# ---------------------------------------------------------------------- normalisation and matching
def test_compact_normalisation_lowercases_and_removes_all_whitespace():
    assert metrics.normalize_compact("  New York\tCity\n") == "newyorkcity"


def test_squad_normalisation_drops_punctuation_articles_and_extra_spaces():
    assert metrics.normalize_answer("The  Beatles!") == "beatles"
    assert metrics.normalize_answer("Robert Downey, Jr.") == "robert downey jr"


def test_substring_rule_matches_gold_inside_generated_text():
    assert metrics.substring_match("The capital of France is Paris.", ["paris"])
    assert metrics.substring_match("It is NewYork, I think", "new york")  # spaces removed on both sides
    assert metrics.substring_match("Answer: Zambia", ["zimbabwe", "zambia"])
    assert not metrics.substring_match("The capital of France is Lyon.", ["paris"])
    assert not metrics.substring_match("anything", [""])  # an empty gold answer never matches


def test_exact_match_uses_the_first_nonempty_line():
    assert metrics.exact_match("\nParis.\nMore text", ["paris"])
    assert not metrics.exact_match("Paris is the capital", ["paris"])
    assert metrics.exact_match("The Beatles", ["beatles"])


def test_agreement_is_normalised_equality():
    assert metrics.answer_agreement("Paris.", "paris")
    assert not metrics.answer_agreement("Paris", "Lyon")


# ---------------------------------------------------------------------- ROUGE
def test_rouge_of_identical_texts_is_one():
    text = "The landslide buried 83 workers in Tibet on Friday morning."
    scores = metrics.rouge(text, text)
    assert scores == {"rouge1": 1.0, "rouge2": 1.0, "rouge_l": 1.0}
    assert metrics.rouge_l(text, text) == 1.0
    assert metrics.rouge_l("", "") == 1.0  # equal outputs agree even with no readable token
    assert metrics.rouge_l("你好", "你好") == 1.0


def test_rouge_of_disjoint_texts_is_zero_and_partial_overlap_in_between():
    assert metrics.rouge("red green blue", "one two three")["rouge_l"] == 0.0
    partial = metrics.rouge("the cat sat on the mat", "the cat lay on the rug")["rouge1"]
    assert 0.0 < partial < 1.0


# ---------------------------------------------------------------------- degeneration
def test_repetition_of_a_looping_string_is_high_and_of_plain_text_zero():
    loop = "the answer is two . " * 10
    assert metrics.repetition(loop) > 0.8
    assert metrics.repetition("one two three four five six seven eight") == 0.0
    assert metrics.repetition("too short") == 0.0
    assert metrics.repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)


def test_collapse_detection():
    assert metrics.is_collapsed("The answer is 2. The answer is 3. The answer is 2. The answer is 3. The answer is 2.")
    assert metrics.is_collapsed("100000000000000000000000")
    assert not metrics.is_collapsed("The capital of France is Paris, a city on the Seine.")
    assert not metrics.is_collapsed("")


# ---------------------------------------------------------------------- fidelity
def test_first_divergence():
    assert metrics.first_divergence([1, 2, 3], [1, 2, 3]) == (3, False)
    assert metrics.first_divergence([1, 2, 3], [1, 9, 3]) == (1, True)
    assert metrics.first_divergence([1, 2], [1, 2, 3]) == (2, True)
    assert metrics.first_divergence([], []) == (0, False)


def test_mean_ignores_missing_values():
    assert metrics.mean([1.0, None, 3.0]) == 2.0
    assert metrics.mean([None]) is None


# ---------------------------------------------------------------------- judge parsing
def test_judge_rating_parsing():
    assert parse_rating("Good answer. Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [8.5]") == 8.5  # FastChat's backup pattern
    assert parse_rating("I would give it a seven.") is None
    assert parse_rating("[[42]]") is None  # outside 1-10


def test_judge_pair_parsing_needs_four_lines_of_two_scores():
    assert parse_pair_scores("8 6\n7 5\n9 7\n8 6\nExplanation...") == (8.0, 6.0)
    assert parse_pair_scores("8 6\nThe first is better.") is None
    assert parse_pair_scores("") is None


# ---------------------------------------------------------------------- baselines
def test_shortgpt_picks_the_lowest_influence_layers_in_order():
    assert shortgpt_layers([0.9, 0.1, 0.5, 0.05, 0.3], 2) == [1, 3]
    with pytest.raises(ValueError):
        shortgpt_layers([0.1, 0.2], 3)


def test_expected_ratio_and_matched_budget():
    pol = SkipPolicy(mode="random", warmup_tokens=2, dense_every=0, skip_budget=3, layer_start=1, layer_end=9)
    # 10 tokens: t = 2..9 skip 3 of 10 layers -> 24 / 100
    assert expected_skip_ratio(pol, 10, [10]) == pytest.approx(0.24)
    assert matched_budget(pol, 10, [10], 0.24) == 3
    assert matched_budget(pol, 10, [10], 0.17) == 2  # 0.16 is the closest
    assert matched_budget(pol, 10, [10], 0.0) == 0


def test_adaptive_ratio_estimate_replays_the_rule():
    L, n = 6, 4
    pol = SkipPolicy(threshold=0.9, warmup_tokens=1, dense_every=0, skip_budget=2, layer_start=1, layer_end=5)
    cos = [[0.5] * n for _ in range(L)]
    for t in range(n):
        cos[2][t] = 0.95  # the test after layer 2 fires: skip layers 3 and 4
    ratio, rate = estimate_adaptive_ratio([cos], [n], pol)
    assert rate == 1.0
    assert ratio == pytest.approx(3 * 2 / (L * n))  # tokens 1..3 skip 2 each
    pol_far = SkipPolicy(threshold=0.9, warmup_tokens=1, dense_every=0, skip_budget=4, layer_start=1, layer_end=5)
    ratio2, _ = estimate_adaptive_ratio([cos], [n], pol_far)
    assert ratio2 == pytest.approx(3 * 2 / (L * n))  # the run stops at the band's end


# ---------------------------------------------------------------------- data and tasks (no model)
def test_freebaseqa_eval_groups_lines_into_answer_sets():
    from ffnskip.data import freebaseqa

    recs = freebaseqa()
    assert len(recs) == 3999  # SOURCE.md: 3,999 unique questions
    assert all(r["answers"] for r in recs)
    assert sum(len(r["answers"]) > 1 for r in recs) > 0
    quoted = [r for r in recs if r["question"].startswith("A 1986 film starring Richard E. Grant")]
    assert quoted and '"one of Britain\'s biggest cult films"' in quoted[0]["question"]


def test_story_split_takes_the_article_before_the_first_highlight():
    from ffnskip.data import split_story

    article, highlights = split_story("Para one.\n\nPara two.\n\n@highlight\n\nFirst point\n\n@highlight\n\nSecond point\n")
    assert article == "Para one.\n\nPara two."
    assert highlights == ["First point", "Second point"]


def test_task_subsets_are_deterministic_and_summaries_stratified():
    from ffnskip.eval.tasks import fingerprint, get_task

    qa = get_task("factoid_qa")
    a, b = qa.load(limit=5, seed=3), qa.load(limit=5, seed=3)
    assert [s.id for s in a] == [s.id for s in b]
    assert fingerprint(a) == fingerprint(b) != fingerprint(qa.load(limit=5, seed=4))
    summ = get_task("summarization").load(limit=3)
    assert sorted(s.meta["bucket"] for s in summ) == ["large", "mid", "small"]
    assert all("@highlight" not in s.input for s in summ)


def test_field_mapping_errors():
    from ffnskip.eval.tasks import EvalError, get_task, parse_field_mappings

    qa = get_task("factoid_qa")
    assert parse_field_mappings(["answer=gold"], qa) == {"question": "question", "answer": "gold"}
    with pytest.raises(EvalError, match="has no field 'foo'"):
        parse_field_mappings(["foo=bar"], qa)
    with pytest.raises(EvalError, match="NAME=COLUMN"):
        parse_field_mappings(["answer"], qa)


def test_user_files_jsonl_json_array_and_csv(tmp_path):
    from ffnskip.eval.tasks import get_task

    qa = get_task("factoid_qa")
    rows = [{"q": "Capital of France?", "gold": ["Paris", "paris"]}, {"q": "2 + 2?", "gold": "4"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.csv").write_text('q,gold\n"Capital of France?","[""Paris"", ""paris""]"\n2 + 2?,4\n')
    for name in ("a.jsonl", "b.json", "c.csv"):
        samples = qa.load(data_file=tmp_path / name, fields=["question=q", "answer=gold"])
        assert [s.input for s in samples] == ["Capital of France?", "2 + 2?"], name
        assert samples[0].reference == ["Paris", "paris"] and samples[1].reference == ["4"], name


def test_dense_cache_round_trips_through_disk(tmp_path):
    from ffnskip.eval import DenseCache

    c1 = DenseCache(tmp_path)
    key = c1.key("gen", "model", [1, 2, 3], {"max_new_tokens": 4})
    assert c1.get(key) is None
    c1.put(key, {"text": "hi", "produced": [5, 6]})
    c2 = DenseCache(tmp_path)  # a new process would see the same file
    assert c2.get(key) == {"text": "hi", "produced": [5, 6]}
    assert (c2.hits, c1.misses) == (1, 1)
    assert key != c1.key("gen", "model", [1, 2, 3], {"max_new_tokens": 5})


def test_short_answers_agree_when_only_the_rest_differs():
    from ffnskip.eval.metrics import answer_agreement, answer_agreement_short, short_answer

    assert short_answer("  \nParis. It is the capital of France.") == "paris"
    assert short_answer("The Eiffel Tower! Built in 1889") == "eiffel tower"
    assert answer_agreement_short("Paris. It is big.", "Paris! A city on the Seine.")
    assert not answer_agreement("Paris. It is big.", "Paris! A city on the Seine.")
    assert not answer_agreement_short("Paris.", "Lyon.")
    assert answer_agreement_short("3.14 is pi", "3.14 is pi.")  # a decimal point is no sentence end
