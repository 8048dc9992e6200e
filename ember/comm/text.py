"""Text baselines under a byte cap: the raw context, or a one-sentence hint the sharer writes, each cut to the
cap at a UTF-8 character boundary and counted as UTF-8 bytes."""

from __future__ import annotations

from ember.engine import SamplingParams
from ember.errors import CommError
from ember.tasks.evaluate import render

HINT_INSTRUCTION = ("Read the text and the question below. Write one sentence giving the background from the "
                    "text that the question needs. Do not answer the question.")
HINT_INSTRUCTION_NO_TEXT = ("Read the question below. Write one sentence of background knowledge that helps to "
                            "answer it. Do not answer the question.")


def truncate_utf8(text: str, cap: int) -> tuple[str, bool]:
    """The longest prefix of `text` whose UTF-8 encoding has at most `cap` bytes (never half a character),
    and whether anything was cut."""
    if cap < 0:
        raise CommError(f"byte cap: expected >= 0, found {cap}")
    data = text.encode("utf-8")
    if len(data) <= cap:
        return text, False
    end = cap
    while end > 0 and (data[end] & 0xC0) == 0x80:  # a continuation byte: the cut would split a character
        end -= 1
    return data[:end].decode("utf-8"), True


def hint_prompt(tokenizer, context: str, question: str) -> str:
    """The sharer's prompt for a hint (one fixed wrapper for every item; without a context, for shared-context
    prompts, the question alone)."""
    content = (f"{HINT_INSTRUCTION}\n\nText: {context}\n\nQuestion: {question}" if context
               else f"{HINT_INSTRUCTION_NO_TEXT}\n\nQuestion: {question}")
    return render(tokenizer, [{"role": "user", "content": content}])


def write_hints(engine, contexts: list[str], questions: list[str], max_tokens: int = 64) -> tuple[list[str], dict]:
    """Greedy one-sentence hints from the sharer, one per item, and the generation's timings."""
    prompts = [hint_prompt(engine.tokenizer, c, q) for c, q in zip(contexts, questions)]
    result = engine.generate(prompts, sampling=SamplingParams(temperature=0, max_tokens=max_tokens), progress=False)
    return [out.completions[0].text.strip() for out in result.outputs], result.timings
