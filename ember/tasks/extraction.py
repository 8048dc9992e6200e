"""Synthetic structured extraction: a document about a person and a JSON schema; the answer is a JSON
object. The verifier checks valid JSON, schema validity and field-level matches, and folds them into one
scalar reward for rollouts and RL."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from ember.tasks.recall import DISTRACTORS, NAMES

CITIES = ("Lisbon", "Oslo", "Quito", "Nairobi", "Osaka", "Lyon", "Perth", "Denver", "Tallinn", "Porto")
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                   "member": {"type": "boolean"}},
    "required": ["name", "age", "city", "member"],
    "additionalProperties": False,
}
_TYPES = {"string": str, "integer": int, "boolean": bool, "number": (int, float), "object": dict}


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
    """Violations of the schema subset used here (object, typed properties, required, no extras)."""
    if not isinstance(value, dict):
        return ["expected an object"]
    errors = [f"missing {key!r}" for key in schema.get("required", []) if key not in value]
    props = schema.get("properties", {})
    for key, item in value.items():
        if key not in props:
            if schema.get("additionalProperties", True) is False:
                errors.append(f"unexpected {key!r}")
            continue
        expected = _TYPES[props[key]["type"]]
        wrong_bool = isinstance(item, bool) and props[key]["type"] in ("integer", "number")
        if not isinstance(item, expected) or wrong_bool:
            errors.append(f"{key!r}: expected {props[key]['type']}, found {type(item).__name__}")
    return errors


def verify(item: ExtractionItem, output: str) -> dict:
    """valid_json, schema_valid, field_match (fraction of gold fields equal) and reward in [0, 1]:
    0 without valid JSON, else 0.25 x schema_valid + 0.75 x field_match."""
    value = extract_json(output)
    if value is None:
        return {"valid_json": False, "schema_valid": False, "field_match": 0.0, "reward": 0.0}
    valid = not schema_errors(value, item.schema)
    matches = sum(value.get(key) == gold and type(value.get(key)) is type(gold) for key, gold in item.answer.items())
    field_match = matches / len(item.answer)
    return {"valid_json": True, "schema_valid": valid, "field_match": field_match,
            "reward": 0.25 * valid + 0.75 * field_match}
