"""Synthetic structured extraction: a document about a person and a JSON schema; the answer is a JSON
object. The verifier checks valid JSON, schema validity (the jsonschema library) and field-level matches, and
folds them into one scalar reward for rollouts and RL, by one of the REWARDS variants."""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass

import jsonschema

from ember.errors import TaskError
from ember.tasks.recall import DISTRACTORS, NAMES

CITIES = ("Lisbon", "Oslo", "Quito", "Nairobi", "Osaka", "Lyon", "Perth", "Denver", "Tallinn", "Porto")
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                   "member": {"type": "boolean"}},
    "required": ["name", "age", "city", "member"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class ExtractionItem:
    document: str
    schema: dict
    answer: dict

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": f"Extract the fields of this JSON schema from the document and reply "
                 f"with one JSON object only.\nSchema: {json.dumps(self.schema)}\n\nDocument: {self.document}"}]


def make_extraction(seed: int, distractors: int = 2) -> ExtractionItem:
    """A seeded document stating name, age, city and membership, among `distractors` unrelated sentences."""
    rng = random.Random(seed)
    answer = {"name": rng.choice(NAMES), "age": rng.randrange(18, 90), "city": rng.choice(CITIES),
              "member": rng.random() < 0.5}
    facts = [f"{answer['name']} is {answer['age']} years old.", f"{answer['name']} lives in {answer['city']}.",
             f"{answer['name']} {'is' if answer['member'] else 'is not'} a member of the club."]
    for _ in range(distractors):
        facts.insert(rng.randrange(len(facts) + 1), rng.choice(DISTRACTORS))
    return ExtractionItem(" ".join(facts), SCHEMA, answer)


def extract_json(text: str) -> dict | None:
    """The first balanced {...} object in the text that parses as JSON (code fences allowed), or None."""
    start = text.find("{")
    while start >= 0:
        depth, in_string, escape = 0, False, False
        for end in range(start, len(text)):
            ch = text[end]
            if in_string:
                escape, in_string = (not escape and ch == "\\"), in_string and (escape or ch != '"')
                continue
            if ch == '"':
                in_string = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    try:
                        value = json.loads(text[start:end + 1])
                        return value if isinstance(value, dict) else None
                    except json.JSONDecodeError:
                        break
        start = text.find("{", start + 1)
    return None


def schema_errors(value, schema: dict) -> list[str]:
    """Readable violations of the JSON Schema `schema` (draft 2020-12) by `value`, one string each ("$.age: '42'
    is not of type 'integer'"); empty when `value` is valid."""
    errors = _validator(json.dumps(schema, sort_keys=True)).iter_errors(value)
    return sorted(f"{error.json_path}: {error.message}" for error in errors)


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> jsonschema.Draft202012Validator:
    """One validator per distinct schema (keyed by its canonical JSON), checked once when built."""
    schema = json.loads(schema_json)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise TaskError(f"schema: expected a valid JSON Schema (draft 2020-12), found {exc.message}") from exc
    return jsonschema.Draft202012Validator(schema)


_REWARDS = {
    "binary": lambda valid, field_match: float(valid and field_match == 1.0),
    "weighted": lambda valid, field_match: 0.25 * valid + 0.75 * field_match,
    "fields": lambda valid, field_match: field_match,
}
REWARDS = tuple(_REWARDS)


def verify(item: ExtractionItem, output: str, reward: str = "weighted") -> dict:
    """valid_json, schema_valid, field_rewards (gold field -> 1.0 when the output's value is equal and of the same
    type, bool is not int, else 0.0), field_match (their mean) and reward in [0, 1], by name (see REWARDS):
    "binary" is 1 iff the schema is valid and every field matches; "weighted" is 0.25 x schema_valid +
    0.75 x field_match (so 0 without valid JSON); "fields" is field_match, schema validity not counted."""
    if reward not in _REWARDS:
        raise TaskError(f"reward: expected one of {', '.join(REWARDS)}, found {reward!r}")
    value = extract_json(output)
    found = {} if value is None else value
    valid = value is not None and not schema_errors(value, item.schema)
    field_rewards = {key: float(found.get(key) == gold and type(found.get(key)) is type(gold))
                     for key, gold in item.answer.items()}
    field_match = sum(field_rewards.values()) / len(field_rewards)
    return {"valid_json": value is not None, "schema_valid": valid, "field_match": field_match,
            "field_rewards": field_rewards, "reward": _REWARDS[reward](valid, field_match)}
