"""Synthetic tasks, answer extraction and accuracy intervals (no model needed)."""

import pytest

from ember.tasks.metrics import accuracy, wilson_interval
from ember.tasks.recall import extract_code, make_recall, recall_items, score


def test_recall_items_are_seeded_and_well_formed():
    a, b = make_recall(10, seed=3), make_recall(10, seed=3)
    assert a == b and a != make_recall(10, seed=4)
    assert a.context.count("The code for") == 10
    assert f"The code for {a.key} is {a.answer}." in a.context
    assert a.question == f"What is the code for {a.key}?"
    assert len({i.answer for i in recall_items(20, 5)}) > 10


def test_key_position_and_context_length():
    first, last = make_recall(8, seed=1, key_position=0.0), make_recall(8, seed=1, key_position=1.0)
    assert first.fact_index == 0 and last.fact_index == 7
    long = make_recall(5, seed=1, context_tokens=300, count_tokens=lambda text: len(text.split()))
    assert len(long.context.split()) >= 300 and long.context.count("The code for") == 5
    with pytest.raises(ValueError, match="facts"):
        make_recall(0, seed=1)


@pytest.mark.parametrize("text, code", [("The code for Bob is 4821.", "4821"), ("4821", "4821"),
                                        ("Answer: 12345", None), ("no idea", None), ("(0042) then 9999", "0042")])
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_score_and_accuracy_interval():
    item = make_recall(3, seed=0)
    assert score(item, f"It is {item.answer}.") and not score(item, "It is 0000.")
    low, high = wilson_interval(45, 100)
    assert 0.35 < low < 0.45 < high < 0.55
    summary = accuracy([True, False, True, True])
    assert summary["accuracy"] == 0.75 and summary["n"] == 4 and summary["ci_low"] < 0.75 < summary["ci_high"]
    assert wilson_interval(0, 0) == (0.0, 1.0)
