"""Prompt templates (zero- and few-shot, as chat messages) and answer extraction for benchmark sets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ember.tasks.datasets import Record

LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the letter of the correct option."
MATH_INSTRUCTION = "Solve the problem step by step, then finish with 'The answer is N.' where N is a number."


def mc_question(record: Record) -> str:
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(record.choices))
    return f"Question: {record.question}\n{options}"


def messages_for(record: Record, shots: tuple[Record, ...] = ()) -> list[dict]:
    """Chat messages: each shot as a user turn and its gold answer as the assistant turn, then the question."""
    math = not record.choices
    instruction = MATH_INSTRUCTION if math else MC_INSTRUCTION
    turns = []
    for shot in shots:
        turns.append({"role": "user", "content": f"{mc_question(shot) if shot.choices else shot.question}\n{instruction}"})
        answer = f"The answer is {shot.answer}." if math else f"The answer is ({shot.gold_letter})."
        turns.append({"role": "assistant", "content": answer})
    question = record.question if math else mc_question(record)
    turns.append({"role": "user", "content": f"{question}\n{instruction}"})
    return turns


def extract_letter(text: str, options: int = 4) -> str | None:
    """The chosen option letter in a free-form answer ('The answer is (B).', 'B', 'Answer: b) ...')."""
    valid = LETTERS[:options]
    patterns = [rf"answer is:?\s*\(?([{valid}])\b", rf"answer:?\s*\(?([{valid}])\b", rf"\(([{valid}])\)",
                rf"^\s*([{valid}])(?:[.):\s]|$)", rf"\b([{valid}])\b"]
    for pattern in patterns:
        match = re.search(pattern, text, flags=re.IGNORECASE | re.MULTILINE if "^" in pattern else re.IGNORECASE)
        if match and (match.group(1).isupper() or "answer" in pattern or "\\(" in pattern):
            return match.group(1).upper()
    return None


def _number(text: str) -> str | None:
    cleaned = text.replace(",", "").replace("$", "").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def extract_number(text: str) -> str | None:
    """The final numeric answer: after '####' or 'answer is', else the last number in the text."""
    for pattern in (r"####\s*(-?[\d,]*\.?\d+)", r"answer is:?\s*\$?(-?[\d,]*\.?\d+)"):
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            return _number(match.group(1))
    numbers = re.findall(r"-?\$?[\d,]*\.?\d+", text)
    return _number(numbers[-1]) if numbers else None


@dataclass(frozen=True)
class BenchmarkItem:
    """A record with its few-shot context, ready for `ember.tasks.evaluate.evaluate`."""

    record: Record
    shots: tuple[Record, ...] = ()

    def messages(self) -> list[dict]:
        return messages_for(self.record, self.shots)


def score(item: BenchmarkItem, output: str) -> bool:
    record = item.record
    if record.choices:
        return extract_letter(output, len(record.choices)) == record.gold_letter
    return extract_number(output) == _number(record.answer)
