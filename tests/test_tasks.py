"""Synthetic tasks, answer extraction and accuracy intervals (no model needed)."""

import pytest

from ember.errors import TaskError
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
    with pytest.raises(TaskError, match="facts"):
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


@pytest.mark.parametrize("text, letter", [
    ("The answer is (B).", "B"), ("B", "B"), ("Answer: c) because...", "C"), ("I think (D) is right", "D"),
    ("A. Planetary density", "A"), ("the answer is b", "B"), ("none of these", None), ("E is wrong", None),
])
def test_extract_letter(text, letter):
    from ember.tasks.prompts import extract_letter

    assert extract_letter(text, 4) == letter


@pytest.mark.parametrize("text, number", [
    ("So she makes 9 * 2 = 18. The answer is 18.", "18"), ("#### 1,234", "1234"), ("It costs $5.50 total", "5.5"),
    ("The answer is -3.", "-3"), ("first 3 then 7", "7"), ("no digits", None), ("The answer is 18.00", "18"),
])
def test_extract_number(text, number):
    from ember.tasks.prompts import extract_number

    assert extract_number(text) == number


def test_messages_and_scoring_on_hand_written_records():
    from ember.tasks.datasets import Record, parse_mc_query
    from ember.tasks.prompts import BenchmarkItem, messages_for, score

    question, choices = parse_mc_query("Question: Which is a star?\n A. Mars\n B. The Sun\n C. The Moon\nAnswer:")
    assert question == "Which is a star?" and choices == ("Mars", "The Sun", "The Moon")
    record = Record("1", question, choices, "1")
    shot = Record("0", "Which is wet?", ("Sand", "Water"), "1")
    turns = messages_for(record, (shot,))
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == "The answer is (B)." and "B. The Sun" in turns[2]["content"]
    assert score(BenchmarkItem(record), "The answer is (B).") and not score(BenchmarkItem(record), "A")
    math = Record("2", "What is 2+2?", (), "4")
    assert "The answer is N" in messages_for(math)[0]["content"]
    assert score(BenchmarkItem(math), "2 + 2 = 4. The answer is 4.")


def test_benchmark_sets_have_the_documented_sizes():
    from ember.tasks import datasets

    if not datasets.is_ready():
        pytest.skip("benchmark sets are not in the ember cache; run `make models` to extract them")
    assert datasets.counts()["arc_challenge"] == {"validation": 299, "test": 1172}
    assert datasets.counts()["gsm8k"] == {"test": 1319}
    records = datasets.load("openbookqa", "validation")
    assert len(records) == 500 and all(len(r.choices) == 4 and 0 <= int(r.answer) < 4 for r in records)
    with pytest.raises(datasets.DatasetError, match="split of gsm8k"):
        datasets.load("gsm8k", "validation")


def test_extraction_verifier_scores_hand_written_outputs():
    import json

    from ember.tasks.extraction import extract_json, make_extraction, verify

    item = make_extraction(seed=5)
    assert item.answer["name"] in item.document and str(item.answer["age"]) in item.document
    perfect = verify(item, "Here you go:\n```json\n" + json.dumps(item.answer) + "\n```")
    assert perfect == {"valid_json": True, "schema_valid": True, "field_match": 1.0,
                       "field_rewards": dict.fromkeys(item.answer, 1.0), "reward": 1.0}
    wrong_age = dict(item.answer, age=str(item.answer["age"]))  # a string where the schema wants an integer
    result = verify(item, json.dumps(wrong_age))
    assert result["valid_json"] and not result["schema_valid"] and result["field_match"] == 0.75
    assert result["reward"] == 0.75 * 0.75
    assert verify(item, "no json here")["reward"] == 0.0
    assert verify(item, '{"name": "x", "extra": 1}')["schema_valid"] is False
    assert extract_json('text {"a": "}"} more') == {"a": "}"}
    assert extract_json("{broken} then {\"ok\": true}") == {"ok": True}


def test_shared_prefix_workload_has_exact_token_lengths():
    from ember.models.tokenizer import CharTokenizer
    from ember.tasks.shared_prefix import shared_prefix_workload

    tok = CharTokenizer()
    work = shared_prefix_workload(tok, documents=4, prefix_tokens=300, suffix_tokens=50, seed=1)
    assert all(len(p) == 350 for p in work.prompts)
    assert all(p[:300] == work.prompts[0][:300] for p in work.prompts)
    assert len({tuple(p[300:]) for p in work.prompts}) == 4
    assert work.prefix_text.startswith("You extract structured records")


def test_removing_the_fact_removes_the_information():
    item = make_recall(10, seed=2)
    lost = item.without_fact()
    assert item.answer in item.context and f"The code for {item.key} is" not in lost.context
    assert lost.context.count("The code for") == 9 and lost.question == item.question
