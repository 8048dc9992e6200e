"""Context-transfer items: a context only the sharer reads, a question the receiver answers, a scorer.

Recall is the primary task: its facts sit only in the context, so the receiver alone is near zero and every
point of accuracy comes from what crossed the wire. Extraction sends the document whose fields the receiver
must return as JSON (correct: the schema holds and every field matches).
"""

from __future__ import annotations

from dataclasses import dataclass

import json

from ember.errors import CommError
from ember.tasks.extraction import make_extraction, verify
from ember.tasks.recall import make_recall, score as recall_score

COMM_TASKS = ("recall", "extraction")
EXTRACTION_QUESTION = ("Extract the fields of this JSON schema from the document above and reply with one JSON "
                       "object only.\nSchema: {schema}")


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
        if self.task == "extraction":
            return extraction_correct(self.source, output)
        raise CommError(f"task: expected one of {COMM_TASKS}, found {self.task!r}")


def extraction_correct(item, output: str) -> bool:
    """An extraction answer is correct when its JSON is schema-valid and every field matches."""
    return verify(item, output, reward="binary")["reward"] == 1.0


def comm_items(task: str, count: int, seed: int, facts: int = 10, context_tokens: int = 0,
               count_tokens=None) -> list[CommItem]:
    """`count` seeded items of a task. Recall: `facts` facts padded with distractors to `context_tokens`
    (counted with `count_tokens`). Extraction: one document (with `facts` distractor sentences) each."""
    if task not in COMM_TASKS:
        raise CommError(f"task: expected one of {COMM_TASKS}, found {task!r}")
    if task == "extraction":
        return [extraction_comm_item(make_extraction(seed + i, distractors=facts), seed + i) for i in range(count)]
    return [recall_comm_item(make_recall(facts, seed + i, context_tokens=context_tokens, count_tokens=count_tokens),
                             seed + i) for i in range(count)]


def recall_comm_item(item, seed: int) -> CommItem:
    """The CommItem of a RecallItem made with `seed`: its context sent, its question asked for the code."""
    return CommItem(f"recall-{seed}", "recall", item.context, f"{item.question} Answer with the 4-digit code only.",
                    item.answer, item)


def extraction_comm_item(doc, seed: int) -> CommItem:
    """The CommItem of an ExtractionItem made with `seed`: its document sent, the schema asked for."""
    return CommItem(f"extraction-{seed}", "extraction", doc.document,
                    EXTRACTION_QUESTION.format(schema=json.dumps(doc.schema)), json.dumps(doc.answer), doc)
