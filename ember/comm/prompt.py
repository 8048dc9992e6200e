"""A receiver prompt cut in three token spans: head (chat template up to the user's text), context, tail
(the question and the template's end). Reading all three is the receiver reading the context itself;
context transfer sends the context span's K/V instead; text baselines put their message in its place."""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import CommError
from ember.tasks.evaluate import render

SLOT = "\x00CONTEXT\x00"  # stands for the context while the template is rendered


@dataclass(frozen=True)
class PromptParts:
    """Token ids of the three spans."""

    head: list[int]
    context: list[int]
    tail: list[int]

    @property
    def full(self) -> list[int]:
        return self.head + self.context + self.tail

    @property
    def without_context(self) -> list[int]:
        return self.head + self.tail


def template_halves(tokenizer, question: str) -> tuple[str, str]:
    """The rendered chat prompt before and after the context, for a user turn "context\\n\\nquestion"."""
    text = render(tokenizer, [{"role": "user", "content": f"{SLOT}\n\n{question}"}])
    if text.count(SLOT) != 1:
        raise CommError("chat template: expected the user's text once in the rendered prompt, found "
                        f"{text.count(SLOT)} copies")
    before, after = text.split(SLOT)
    return before, after


def prompt_parts(tokenizer, context: str, question: str) -> PromptParts:
    """The spans of one item with `context` in its slot (each span tokenized on its own)."""
    before, after = template_halves(tokenizer, question)
    return PromptParts(tokenizer.encode(before), tokenizer.encode(context) if context else [], tokenizer.encode(after))
