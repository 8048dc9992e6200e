"""Data of shared-context fusion and of context-transfer projectors: the offline training mixes and the
evaluation sets, with ids that never overlap (a fuser or projector is never evaluated on what it trained on).

Training: MMLU (dev, validation, test), ARC-Easy (validation, test), and synthetic recall items whose seeds
start at TRAIN_SEED_BASE. Evaluation: OpenBookQA and ARC-Challenge (test), recall items with seeds below
TRAIN_SEED_BASE, synthetic extraction (never trained on by a fuser) and GSM8K (test) as a breadth check.
A projector trains on recall and extraction items whose seeds start at TRAIN_SEED_BASE (evaluation's stay
below). Multiple-choice answers are "The answer is (X).", as in the benchmark prompts' worked shots.
"""

from __future__ import annotations

import random

from ember.comm.fusion import FusionExample
from ember.comm.items import CommItem, comm_items
from ember.errors import CommError
from ember.tasks.prompts import BenchmarkItem, messages_for
from ember.tasks.extraction import make_extraction
from ember.tasks.recall import make_recall

TRAIN_SEED_BASE = 1_000_000
TRAIN_BENCHMARKS = (("mmlu", ("dev", "validation", "test")), ("arc_easy", ("validation", "test")))
EVAL_TASKS = ("recall", "extraction", "openbookqa", "arc_challenge", "gsm8k")


def _mc_example(task: str, record, with_answer: bool) -> FusionExample:
    answer = f"The answer is ({record.gold_letter})." if with_answer else ""
    return FusionExample(f"{task}:{record.id}", tuple(messages_for(record)), answer)


def _recall_example(seed: int, facts: int, with_answer: bool) -> FusionExample:
    item = make_recall(facts, seed)
    return FusionExample(f"recall:{seed}", tuple(item.messages()), item.answer if with_answer else "")


def training_examples(count: int, seed: int = 0, recall_share: float = 0.25, facts: int = 10) -> list[FusionExample]:
    """`count` training examples, shuffled with `seed`: a `recall_share` of synthetic recall, the rest drawn
    from the benchmark training pool."""
    from ember.tasks.datasets import load

    if count < 1 or not 0.0 <= recall_share <= 1.0:
        raise CommError(f"training examples: expected count >= 1 and recall_share in [0, 1], found {count}, "
                        f"{recall_share}")
    recall = round(count * recall_share)
    pool = [] if recall == count else [_mc_example(task, r, True) for task, splits in TRAIN_BENCHMARKS
                                       for split in splits for r in load(task, split)]
    rng = random.Random(seed)
    rng.shuffle(pool)
    examples = pool[:count - recall] + [_recall_example(TRAIN_SEED_BASE + seed * count + i, facts, True)
                                        for i in range(recall)]
    rng.shuffle(examples)
    return examples


def transfer_training_items(count: int, seed: int = 0, extraction_share: float = 0.25, facts: int = 10,
                            context_tokens: int = 0, count_tokens=None) -> list[CommItem]:
    """`count` context-transfer training items with answers, shuffled with `seed`: an `extraction_share` of
    extraction documents, the rest recall contexts of `facts` facts padded to `context_tokens`."""
    if count < 1 or not 0.0 <= extraction_share <= 1.0:
        raise CommError(f"transfer training items: expected count >= 1 and extraction_share in [0, 1], found "
                        f"{count}, {extraction_share}")
    extraction = round(count * extraction_share)
    first = TRAIN_SEED_BASE + seed * count
    items = comm_items("extraction", extraction, first, facts=facts) if extraction else []
    if count > extraction:
        items += comm_items("recall", count - extraction, first, facts=facts, context_tokens=context_tokens,
                            count_tokens=count_tokens)
    random.Random(seed).shuffle(items)
    return items


def eval_examples(task: str, count: int, seed: int = 0, facts: int = 10) -> tuple[list[FusionExample], list]:
    """`count` evaluation examples of a task (no answers) and the scorer's items (RecallItem,
    ExtractionItem or BenchmarkItem), in the same order."""
    from ember.tasks.datasets import load

    if task == "recall":
        if seed + count > TRAIN_SEED_BASE:
            raise CommError(f"recall evaluation seeds must stay below {TRAIN_SEED_BASE} (training's), found "
                            f"{seed}..{seed + count - 1}")
        items = [make_recall(facts, seed + i) for i in range(count)]
        return [_recall_example(seed + i, facts, False) for i in range(count)], items
    if task == "extraction":
        items = [make_extraction(seed + i, distractors=facts) for i in range(count)]
        return [FusionExample(f"extraction:{seed + i}", tuple(item.messages())) for i, item in enumerate(items)], items
    if task not in EVAL_TASKS:
        raise CommError(f"evaluation task: expected one of {EVAL_TASKS}, found {task!r}")
    records = load(task, "test")[:count]
    return [_mc_example(task, r, False) for r in records], [BenchmarkItem(r) for r in records]


def check_disjoint(train_ids, eval_ids) -> None:
    """Raise CommError if an evaluation id is among the training ids."""
    shared = sorted(set(train_ids) & set(eval_ids))
    if shared:
        raise CommError(f"evaluation items the fuser trained on: expected none, found {len(shared)} "
                        f"(e.g. {shared[:3]})")
