"""Verifiers: the extraction task's JSON Schema check and reward variants (no model needed)."""

import json
import random
import time

import pytest

from ember.errors import TaskError
from ember.tasks.extraction import REWARDS, SCHEMA, make_extraction, schema_errors, verify

ANSWER = {"name": "Alice", "age": 42, "city": "Oslo", "member": True}
ITEM = make_extraction(seed=5)


@pytest.mark.parametrize("value, errors", [
    (ANSWER, []),
    (dict(ANSWER, age="42"), ["$.age: '42' is not of type 'integer'"]),
    (dict(ANSWER, age=True), ["$.age: True is not of type 'integer'"]),
    (dict(ANSWER, member=1), ["$.member: 1 is not of type 'boolean'"]),
    (dict(ANSWER, extra=1), ["$: Additional properties are not allowed ('extra' was unexpected)"]),
    ({"name": "Alice", "age": 42, "member": True}, ["$: 'city' is a required property"]),
    ({"age": "x", "city": "Oslo"}, ["$.age: 'x' is not of type 'integer'", "$: 'member' is a required property",
                                    "$: 'name' is a required property"]),
    (dict(ANSWER, age=42.0), []),  # JSON Schema: 42.0 is an integer (field matching is type-exact, see below)
])
def test_schema_errors_name_each_violation(value, errors):
    assert schema_errors(value, SCHEMA) == errors


def test_schema_errors_use_the_whole_json_schema_language():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}},
                                               "score": {"type": "number", "minimum": 0}}}
    assert schema_errors({"tags": ["a", 1], "score": -1}, schema) == [
        "$.score: -1 is less than the minimum of 0", "$.tags[1]: 1 is not of type 'string'"]
    assert schema_errors([ANSWER], SCHEMA)[0].endswith("is not of type 'object'")
    with pytest.raises(TaskError, match="valid JSON Schema"):
        schema_errors({}, {"type": "no-such-type"})


@pytest.mark.parametrize("output, field_rewards, rewards", [
    (json.dumps(ITEM.answer), dict.fromkeys(ITEM.answer, 1.0), (1.0, 1.0, 1.0)),
    (json.dumps(dict(ITEM.answer, age=str(ITEM.answer["age"]))), dict.fromkeys(ITEM.answer, 1.0) | {"age": 0.0},
     (0.0, 0.75 * 0.75, 0.75)),
    (json.dumps(dict(ITEM.answer, age=float(ITEM.answer["age"]))), dict.fromkeys(ITEM.answer, 1.0) | {"age": 0.0},
     (0.0, 0.25 + 0.75 * 0.75, 0.75)),
    (json.dumps(dict(ITEM.answer, city="Atlantis")), dict.fromkeys(ITEM.answer, 1.0) | {"city": 0.0},
     (0.0, 0.25 + 0.75 * 0.75, 0.75)),
    (json.dumps(dict(ITEM.answer, extra=1)), dict.fromkeys(ITEM.answer, 1.0), (0.0, 0.75, 1.0)),
    ("no json here", dict.fromkeys(ITEM.answer, 0.0), (0.0, 0.0, 0.0)),
])
def test_reward_variants_on_crafted_outputs(output, field_rewards, rewards):
    assert REWARDS == ("binary", "weighted", "fields")
    results = [verify(ITEM, output, reward=name) for name in REWARDS]
    assert all(r["field_rewards"] == field_rewards for r in results)
    assert tuple(r["reward"] for r in results) == rewards


def test_weighted_reward_is_the_old_formula_and_the_default():
    """Random mutations with known effects: weighted = 0.25 x schema_valid + 0.75 x field_match exactly."""
    rng = random.Random(0)
    other_value = {"name": lambda v: v + "x", "age": lambda v: v + 1, "city": str.lower, "member": lambda v: not v}
    other_type = {"name": lambda v: 7, "age": str, "city": lambda v: None, "member": int}
    for seed in range(200):
        item = make_extraction(seed)
        value, valid, matches = {}, True, 0
        for key, gold in item.answer.items():
            change = rng.choice(("keep", "value", "type", "drop"))
            if change == "keep":
                value[key], matches = gold, matches + 1
            elif change == "value":
                value[key] = other_value[key](gold)
            elif change == "type":
                value[key], valid = other_type[key](gold), False
            else:
                valid = False
        if rng.random() < 0.2:
            value["extra"], valid = 1, False
        output = json.dumps(value)
        result = verify(item, output)
        assert result["schema_valid"] is valid and result["field_match"] == matches / 4
        assert result["reward"] == verify(item, output, "weighted")["reward"] == 0.25 * valid + 0.75 * matches / 4
        assert verify(item, output, "binary")["reward"] == float(valid and matches == 4)
        assert verify(item, output, "fields")["reward"] == matches / 4


def test_unknown_reward_variant_names_the_valid_ones():
    with pytest.raises(TaskError, match="expected one of binary, weighted, fields, found 'partial'"):
        verify(ITEM, json.dumps(ITEM.answer), reward="partial")
