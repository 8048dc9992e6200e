"""Token alignment between two tokenizers: one sharer token per receiver token, so the fuser can pair the
receiver's K/V of a token with the sharer's K/V of "the same" token.

Content tokens: each receiver token is decoded on its own and re-encoded with the sharer's tokenizer, and the
sharer token covering the longest piece of that text is kept (whole characters count, byte fragments none); a
receiver token that decodes to nothing keeps the sharer's pad token, and one only byte fragments cover keeps
the first fragment, both marked invalid.
Chat-template sections differ between families, so each side renders its own template and the sharer's section
is padded on the left with invalid tokens, or cut to its last tokens, to the receiver's section length.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.comm.prompt import PromptParts, prompt_parts
from ember.errors import CommError
from ember.tasks.evaluate import render

SLOT = "\x00USER\x00"


@dataclass(frozen=True)
class AlignedPrompt:
    """Receiver ids (T,), sharer ids (T,) one per receiver token, and which sharer tokens are real."""

    receiver_ids: list[int]
    sharer_ids: list[int]
    sharer_valid: list[bool]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def align_content(receiver_tok, sharer_tok, ids: list[int]) -> tuple[list[int], list[bool]]:
    """One sharer token per receiver content token (the longest of the re-encoded piece) and validity."""
    out, valid = [], []
    for token in ids:
        piece = receiver_tok.decode([token])
        candidates = sharer_tok.encode(piece) if piece and "\ufffd" not in piece else []
        if not candidates:
            out.append(_pad_id(sharer_tok))
            valid.append(False)
            continue
        pieces = [sharer_tok.decode([c]) for c in candidates]
        lengths = [len(p) if "\ufffd" not in p else 0 for p in pieces]  # a byte fragment covers no character
        out.append(candidates[lengths.index(max(lengths))])  # the first of the longest
        valid.append(max(lengths) > 0)
    return out, valid


def pad_section(ids: list[int], length: int, pad_id: int) -> tuple[list[int], list[bool]]:
    """A template section brought to `length` tokens: left-padded with invalid pads, or its last tokens."""
    if len(ids) >= length:
        return ids[len(ids) - length:], [True] * length
    missing = length - len(ids)
    return [pad_id] * missing + ids, [False] * missing + [True] * len(ids)


def _halves(tokenizer, messages: list[dict]) -> tuple[str, str, str]:
    """The template before the last user turn's text, that text, and the template after it."""
    if not messages or messages[-1].get("role") != "user":
        raise CommError("align: expected chat messages ending with a user turn")
    content = messages[-1]["content"]
    text = render(tokenizer, messages[:-1] + [{"role": "user", "content": SLOT}])
    if text.count(SLOT) != 1:
        raise CommError(f"align: expected the user's text once in the rendered template, found {text.count(SLOT)}")
    before, after = text.split(SLOT)
    return before, content, after


def align_prompt(receiver_tok, sharer_tok, messages: list[dict]) -> AlignedPrompt:
    """Both sides' prompts for the same messages, the sharer's cut to one token per receiver token."""
    r_before, content, r_after = _halves(receiver_tok, messages)
    s_before, _, s_after = _halves(sharer_tok, messages)
    head, body, tail = receiver_tok.encode(r_before), receiver_tok.encode(content), receiver_tok.encode(r_after)
    pad = _pad_id(sharer_tok)
    s_head, v_head = pad_section(sharer_tok.encode(s_before), len(head), pad)
    s_body, v_body = align_content(receiver_tok, sharer_tok, body)
    s_tail, v_tail = pad_section(sharer_tok.encode(s_after), len(tail), pad)
    return AlignedPrompt(head + body + tail, s_head + s_body + s_tail, v_head + v_body + v_tail)


def sharer_parts(receiver_tok, sharer_tok, context: str, question: str) -> PromptParts:
    """The sharer's spans of a context-transfer item (its own template head and tail), its context as one
    token per receiver context token: the sharer's own tokens where both tokenizers encode the context alike,
    else aligned (`align_content`; a receiver token no sharer token covers reads the sharer's pad token)."""
    theirs = prompt_parts(sharer_tok, context, question)
    mine = receiver_tok.encode(context) if context else []
    if theirs.context == mine:
        return theirs
    aligned, _ = align_content(receiver_tok, sharer_tok, mine)
    return PromptParts(theirs.head, aligned, theirs.tail)


PROBE = "The code for Alice is 4821. Héllo wörld, naïve café!"


def same_tokenizer(receiver_tok, sharer_tok) -> bool:
    """Whether two tokenizers give the same ids (same vocabulary size, same ids for a probe text): K/V then
    moves between the models without alignment."""
    return (receiver_tok is sharer_tok or (receiver_tok.vocab_size == sharer_tok.vocab_size
                                           and receiver_tok.encode(PROBE) == sharer_tok.encode(PROBE)))
