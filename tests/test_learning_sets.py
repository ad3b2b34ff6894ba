"""The learning-outcome evaluation sets are what they claim: out-of-distribution sets share no
wording with the training text, every gold answer is right, and the intervals are Wilson's."""
from __future__ import annotations

import re

import pytest

from toolformer_ray.evaluation.arithmetic import eval_set, training_documents
from toolformer_ray.evaluation.metrics import math_correct
from toolformer_ray.evaluation.outcome import outcome_markdown, outcome_rows, wilson
from toolformer_ray.evaluation.report import EvalRow


def _ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z]+", text.lower())  # words only: numbers differ by construction
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_out_of_distribution_sets_share_no_wording_with_training_text():
    train = set()
    for d in training_documents(3000, seed=0) + training_documents(3000, seed=1):
        train |= _ngrams(d["text"])
        assert "Question:" not in d["text"] and "Answer:" not in d["text"]
    for kind in ("one_step", "multi_digit", "compound"):
        shared = set()
        for ex in eval_set(300, kind=kind):
            shared |= _ngrams(ex["question"]) & train
        assert not shared, (kind, sorted(shared)[:5])
    # the near set is near: its questions reuse the training names and items
    near = eval_set(50, kind="near")
    assert any(_ngrams(ex["question"], 2) & set().union(*(_ngrams(d["text"], 2) for d in
               training_documents(200))) for ex in near)


def _solve(question: str) -> float:
    """An independent solution of each template, from its numbers and wording."""
    nums = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", question.replace("%", ""))]
    q = question.lower()
    if "average" in q:
        return sum(nums[:-1]) / len(nums[:-1])  # the last number is the game count
    if "% off" in question:
        return nums[0] * (100 - nums[1]) / 100
    if "%" in question:
        return nums[0] * nums[1] / 100
    if "at the same speed" in q:
        return nums[0] / nums[1] * nums[2]
    if "change" in q:
        return nums[2] - nums[0] * nums[1]
    if any(w in q for w in ("donation", "spring")):
        return nums[0] + nums[1]
    if any(w in q for w in ("still free", "balance")):
        return nums[0] - nums[1]
    if any(w in q for w in ("hourly", "equal pieces")):
        return nums[0] / nums[1]
    return nums[0] * nums[1]


@pytest.mark.parametrize("kind", ["one_step", "multi_digit", "compound"])
def test_gold_answers_are_right(kind):
    for ex in eval_set(200, kind=kind):
        gold = float(ex["answer"].removeprefix("#### "))
        assert gold == pytest.approx(_solve(ex["question"])), ex
        assert math_correct(f" {ex['answer'].removeprefix('#### ')}", gold)


def test_wilson_interval_and_table():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 40)
    assert lo == 0.0 and hi == pytest.approx(0.0876, abs=1e-4)
    rows = [EvalRow("math", "one_step", m, mode, 40, correct=c, with_call=w)
            for m, mode, c, w in [("default", "disabled", 1, 0), ("default", "tools", 0, 0),
                                  ("ft", "disabled", 2, 0), ("ft", "tools", 12, 36)]]
    recs = outcome_rows(rows, {"one_step": "out"}, "default", "ft")
    assert recs[0]["tuned_tools"] == {"correct": 12, "calls": 36} and recs[0]["n"] == 40
    md = outcome_markdown(recs)
    assert "| one_step | out | 40 | 2% [0-13] | 0% [0-9] | 5% [1-17] | 30% [18-45] | 90% |" in md
