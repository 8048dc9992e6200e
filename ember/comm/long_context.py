"""Long contexts for the regime map: each recall or extraction item padded to a token bucket (512, 2048, 8192
receiver tokens) with filler prose from a pinned, generated corpus, seeded by the item's id.

The corpus is generated here from fixed word lists (FILLER_VERSION names it; a change to the lists or the
grammar must bump it): neutral sentences with no names, codes or cities of the tasks, so filler never answers
a question. The task's own sentences (recall facts, the extraction document) keep their order and are spread
among the filler at seeded places; where the asked fact lands is recorded as `fact_position`, the fraction of
the context's characters before it.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass

from ember.comm.items import COMM_TASKS, CommItem, extraction_comm_item, recall_comm_item
from ember.errors import CommError
from ember.tasks.extraction import make_extraction
from ember.tasks.recall import make_recall

FILLER_VERSION = "filler-v1"
_SUBJECTS = ("The old mill", "A quiet harbor", "The northern trail", "The village choir", "A narrow bridge",
             "The orchard", "The lighthouse keeper", "A traveling band", "The weekly market", "The stone chapel",
             "A small ferry", "The school garden", "The hill farm", "The tide pool", "A wooden cabin",
             "The county fair", "The reading room", "A long canal", "The pottery studio", "The mountain pass")
_VERBS = ("stood empty", "drew a small crowd", "was repainted", "flooded briefly", "reopened", "grew busier",
          "was mentioned in the newsletter", "stayed closed", "changed its hours", "hosted a gathering",
          "needed repairs", "looked different", "was quiet", "attracted visitors", "was cleaned")
_TIMES = ("after the storm", "in late autumn", "during the festival", "on most weekends", "at dawn",
          "for a few weeks", "before the harvest", "that summer", "in the evenings", "once the snow melted",
          "around midday", "all winter", "by the end of spring", "on rainy days", "last season")
_CODAS = ("", " Nobody seemed surprised.", " Few people noticed.", " It was the talk of the town for a day.",
          " The change did not last.", " Most residents approved.", " Photographs of it circulated widely.")


@functools.lru_cache(maxsize=1)
def filler_corpus() -> tuple[str, ...]:
    """The pinned filler sentences (every subject x verb x time, one seeded coda each), in a seeded order."""
    rng = random.Random(FILLER_VERSION)
    sentences = [f"{s} {v} {t}.{rng.choice(_CODAS)}" for s in _SUBJECTS for v in _VERBS for t in _TIMES]
    rng.shuffle(sentences)
    return tuple(sentences)


@dataclass(frozen=True)
class Padded:
    """A context padded with filler: the text, its token count and where the key sentence starts (a fraction
    of the context's characters)."""

    context: str
    tokens: int
    fact_position: float


def pad_with_filler(sentences: list[str], key: int, target_tokens: int, count_tokens, seed: str) -> Padded:
    """The task's `sentences` (in order) spread among filler sentences so the context has close to, and at
    most, `target_tokens` tokens (counted by `count_tokens(text)`); `key` indexes the sentence whose position
    is recorded. Raises CommError if the task's own sentences already exceed the target."""
    corpus = filler_corpus()
    rng = random.Random(seed)
    base = " ".join(sentences)
    used = count_tokens(base)
    if used > target_tokens:
        raise CommError(f"long context: expected the task's text to fit in {target_tokens} tokens, found {used}")
    fill = []
    cost = _sentence_costs(count_tokens)
    start = rng.randrange(len(corpus))
    shortest = min(cost)
    for step in range(len(corpus) * 8):  # walk the corpus from a seeded start, skipping what does not fit
        if target_tokens - used < shortest:
            break
        index = (start + step) % len(corpus)
        if used + cost[index] <= target_tokens:
            fill.append(corpus[index])
            used += cost[index]
    # Spread the task's sentences among the filler at seeded places, keeping both orders.
    places = sorted(rng.randrange(len(fill) + 1) for _ in sentences)
    parts, offset = [], 0
    for sentence, place in zip(sentences, places):
        parts += fill[offset:place] + [sentence]
        offset = place
    parts += fill[offset:]
    text = " ".join(parts)
    while count_tokens(text) > target_tokens:  # the per-sentence costs are close, not exact: trim filler
        parts = _drop_last_filler(parts, set(sentences))
        text = " ".join(parts)
    before = " ".join(parts[:parts.index(sentences[key])])
    offset = len(before) + 1 if before else 0  # the joining space belongs before the key sentence
    return Padded(text, count_tokens(text), offset / len(text))


def _drop_last_filler(parts: list[str], keep: set[str]) -> list[str]:
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] not in keep:
            return parts[:i] + parts[i + 1:]
    raise CommError("long context: no filler left to trim")


@functools.lru_cache(maxsize=8)
def _sentence_costs(count_tokens) -> tuple[int, ...]:
    """Tokens each filler sentence adds after a space (counted once per token-counting function)."""
    return tuple(count_tokens(" " + sentence) for sentence in filler_corpus())


@dataclass(frozen=True)
class LongItem:
    """A CommItem padded to a bucket, with its actual context length and the asked fact's position."""

    item: CommItem
    bucket: int
    context_len: int
    fact_position: float


def long_items(task: str, count: int, seed: int, bucket: int, count_tokens, facts: int = 10) -> list[LongItem]:
    """`count` items of `task` (seeds seed, seed+1, ...) padded to `bucket` context tokens with filler seeded
    by each item's id. Recall keeps `facts` facts; extraction's document keeps its sentences in order."""
    if task not in COMM_TASKS:
        raise CommError(f"task: expected one of {COMM_TASKS}, found {task!r}")
    if bucket < 1:
        raise CommError(f"context bucket: expected a positive token count, found {bucket}")
    out = []
    for i in range(count):
        if task == "recall":
            item = make_recall(facts, seed + i)
            sentences = _sentences(item.context)
            padded = pad_with_filler(sentences, item.fact_index, bucket, count_tokens, f"recall-{seed + i}-{bucket}")
            comm = recall_comm_item(dataclasses.replace(item, context=padded.context), seed + i)
        else:
            doc = make_extraction(seed + i, distractors=0)
            sentences = _sentences(doc.document)
            padded = pad_with_filler(sentences, 0, bucket, count_tokens, f"extraction-{seed + i}-{bucket}")
            comm = extraction_comm_item(dataclasses.replace(doc, document=padded.context), seed + i)
        out.append(LongItem(comm, bucket, padded.tokens, padded.fact_position))
    return out


def _sentences(text: str) -> list[str]:
    """A task text's sentences (each ends with a period; they were joined by single spaces)."""
    return [part if part.endswith(".") else part + "." for part in text.split(". ")]
