"""Shared-prefix text workload: D documents behind one long common prefix (instructions + schema), with
prefix and suffix lengths controlled exactly in the model's tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ember.tasks.extraction import SCHEMA, make_extraction

INSTRUCTIONS = ("You extract structured records from documents. Read the document carefully. Reply with one "
                "JSON object that follows the schema exactly: no prose, no code fences, no extra keys. Use the "
                "document's own spelling for names and cities; ages are integers; membership is true or false. "
                "If a field is not stated, guess the most likely value. ")


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """Token-level prompts (prefix + suffix ids) and the prefix text they start with."""

    prefix_text: str
    prompts: list[list[int]]
    prefix_tokens: int
    suffix_tokens: int


def _tokens_of(tokenizer, text_source, length: int) -> list[int]:
    """Exactly `length` tokens from repeating text chunks produced by `text_source(i)`."""
    ids, i = [], 0
    while len(ids) < length:
        ids += tokenizer.encode(text_source(i))
        i += 1
    return ids[:length]


def shared_prefix_workload(tokenizer, documents: int, prefix_tokens: int, suffix_tokens: int,
                           seed: int = 0) -> SharedPrefixWorkload:
    """`documents` prompts: the same `prefix_tokens`-token prefix (instructions + schema, repeated as needed),
    then `suffix_tokens` tokens of each document's own text."""
    header = INSTRUCTIONS + "Schema: " + json.dumps(SCHEMA) + "\n"
    prefix = _tokens_of(tokenizer, lambda i: header if i == 0 else INSTRUCTIONS, prefix_tokens)
    prompts = []
    for d in range(documents):
        suffix = _tokens_of(tokenizer, lambda i: f"\nDocument: {make_extraction(seed + d * 1000 + i).document}",
                            suffix_tokens)
        prompts.append(prefix + suffix)
    return SharedPrefixWorkload(tokenizer.decode(prefix), prompts, prefix_tokens, suffix_tokens)
