"""Context-transfer items: a context only the sharer reads, a question the receiver answers, a scorer.

Recall is the primary task: its facts sit only in the context, so the receiver alone is near zero and every
point of accuracy comes from what crossed the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import CommError
from ember.tasks.recall import make_recall, score as recall_score

COMM_TASKS = ("recall",)


@dataclass(frozen=True)
class CommItem:
    """One sample: `context` (sent by the sharer), `question` (the receiver's part of the user turn), the gold
    `answer`, and the task that scores it. `item_id` is stable across runs (task, seed)."""

    item_id: str
    task: str
    context: str
    question: str
    answer: str
    source: object = None

    def score(self, output: str) -> bool:
        if self.task == "recall":
            return recall_score(self.source, output)
        raise CommError(f"task: expected one of {COMM_TASKS}, found {self.task!r}")


def comm_items(task: str, count: int, seed: int, facts: int = 10, context_tokens: int = 0,
               count_tokens=None) -> list[CommItem]:
    """`count` seeded items of a task. Recall: `facts` facts padded with distractors to `context_tokens`
    (counted with `count_tokens`)."""
    if task not in COMM_TASKS:
        raise CommError(f"task: expected one of {COMM_TASKS}, found {task!r}")
    items = []
    for i in range(count):
        item = make_recall(facts, seed + i, context_tokens=context_tokens, count_tokens=count_tokens)
        items.append(CommItem(f"recall-{seed + i}", "recall", item.context,
                              f"{item.question} Answer with the 4-digit code only.", item.answer, item))
    return items
