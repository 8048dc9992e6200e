"""Synthetic key-value recall: a context of F facts ("The code for Alice is 4821.") among distractor
sentences, and a question about one key. Seeded; no download. Accuracy drops as context information is lost,
which makes it the offline quality signal for KV reuse and cache transfer."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ember.errors import TaskError

NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj",
         "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Uma", "Victor", "Walter", "Xena", "Yusuf", "Zoe", "Quinn",
         "Ruth", "Sam", "Tina", "Ursula", "Vince", "Wendy")
DISTRACTORS = ("The weather in the valley was mild that week.", "A train left the station at noon.",
               "The library closes early on holidays.", "Several birds gathered near the old fountain.",
               "The committee postponed its decision until spring.", "A new bakery opened on the corner.",
               "The river rose after two days of rain.", "Most of the staff prefer tea to coffee.",
               "The museum added a wing for modern sculpture.", "Traffic was light along the coastal road.")


@dataclass(frozen=True)
class RecallItem:
    """One recall question: the context, the question, the gold 4-digit code, and where the fact sits."""

    context: str
    question: str
    answer: str
    key: str
    fact_index: int
    facts: int

    def without_fact(self) -> "RecallItem":
        """The same item with the asked fact removed from the context (the information is lost)."""
        fact = f"The code for {self.key} is {self.answer}."
        return RecallItem(self.context.replace(fact, "").replace("  ", " ").strip(), self.question, self.answer,
                          self.key, self.fact_index, self.facts)

    def messages(self) -> list[dict]:
        """Chat messages for an instruct model."""
        return [{"role": "user", "content": f"{self.context}\n\n{self.question} Answer with the 4-digit code only."}]


def make_recall(facts: int, seed: int, key_position: float | None = None, context_tokens: int = 0,
                count_tokens=None) -> RecallItem:
    """A recall item with `facts` facts. `key_position` in [0, 1] places the asked fact (None: random);
    with `context_tokens` and a `count_tokens(text)` function, distractors are added until the context has
    at least that many tokens."""
    if not 1 <= facts <= len(NAMES):
        raise TaskError(f"facts: expected 1..{len(NAMES)}, found {facts}")
    rng = random.Random(seed)
    names = rng.sample(NAMES, facts)
    codes = [f"{rng.randrange(1000, 10000)}" for _ in names]
    index = rng.randrange(facts) if key_position is None else min(facts - 1, round(key_position * (facts - 1)))
    sentences = [f"The code for {name} is {code}." for name, code in zip(names, codes)]
    context = " ".join(sentences)
    if context_tokens and count_tokens is not None:
        while count_tokens(context) < context_tokens:
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(DISTRACTORS))
            context = " ".join(sentences)
    return RecallItem(context, f"What is the code for {names[index]}?", codes[index], names[index], index, facts)


def recall_items(count: int, facts: int, seed: int = 0, **kwargs) -> list[RecallItem]:
    """`count` independent items (seeds seed, seed+1, ...)."""
    return [make_recall(facts, seed + i, **kwargs) for i in range(count)]


def extract_code(text: str) -> str | None:
    """The first 4-digit number in a model's answer, or None."""
    match = re.search(r"(?<!\d)(\d{4})(?!\d)", text)
    return match.group(1) if match else None


def score(item: RecallItem, output: str) -> bool:
    return extract_code(output) == item.answer
