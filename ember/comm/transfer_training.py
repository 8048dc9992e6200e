"""Training a context-transfer projector: the sharer reads head + context, the projector maps the context's
K/V into the receiver's space, and the receiver, which never reads the context, answers after its own head
K/V followed by the projected context; the objective is the next-token loss of the answer's tokens.

`transfer_batch` builds a batch's tensors (prompts left-padded so every row's context ends its prompt; the
tail and answer right-padded), `projected_past` the receiver's past and `transfer_loss` the objective. One
tokenizer is required: context token i is one token on both sides (the strong-to-weak pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.comm.align import sharer_parts
from ember.comm.items import CommItem
from ember.comm.kv_forward import capture_kv, forward_after_past
from ember.comm.prompt import prompt_parts
from ember.errors import CommError

IGNORE = -100  # targets that carry no loss


@dataclass
class TransferBatch:
    """Left-padded sharer prompts (b, S) and receiver prompts (b, R), each head + context, with validity;
    per row the context length and both head lengths (b,); right-padded receiver inputs (b, W) = tail then
    answer, their validity and next-token targets (IGNORE outside the answer)."""

    sharer_ids: torch.Tensor
    sharer_valid: torch.Tensor
    receiver_ids: torch.Tensor
    receiver_valid: torch.Tensor
    context_len: torch.Tensor
    sharer_head: torch.Tensor
    receiver_head: torch.Tensor
    new_ids: torch.Tensor
    new_valid: torch.Tensor
    targets: torch.Tensor


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        valid[row, width - len(tokens):] = True
    return ids, valid


def transfer_batch(items: list[CommItem], receiver_tok, sharer_tok, device) -> TransferBatch:
    """The batch tensors of items with answers (each answer ends with the receiver's end-of-sequence token)."""
    if not items or any(not item.answer for item in items):
        raise CommError("transfer batch: expected at least one item, every item with an answer")
    eos = [receiver_tok.eos_token_id] if receiver_tok.eos_token_id is not None else []
    sharer_rows, receiver_rows, contexts, heads, inputs, targets = [], [], [], [], [], []
    for item in items:
        mine = prompt_parts(receiver_tok, item.context, item.question)
        theirs = sharer_parts(receiver_tok, sharer_tok, item.context, item.question)
        if not mine.context:
            raise CommError(f"item {item.item_id}: a projector expects a non-empty context, found none")
        sequence = mine.tail + receiver_tok.encode(item.answer) + eos
        sharer_rows.append(theirs.head + theirs.context)
        receiver_rows.append(mine.head + mine.context)
        contexts.append(len(mine.context))
        heads.append((len(theirs.head), len(mine.head)))
        inputs.append(sequence[:-1])
        targets.append([IGNORE] * (len(mine.tail) - 1) + sequence[len(mine.tail):])
    sharer_ids, sharer_valid = _left_padded(sharer_rows)
    receiver_ids, receiver_valid = _left_padded(receiver_rows)
    width = max(map(len, inputs))
    new_ids = torch.zeros(len(items), width, dtype=torch.long)
    new_valid = torch.zeros(len(items), width, dtype=torch.bool)
    target_ids = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, (tokens, wanted) in enumerate(zip(inputs, targets)):
        new_ids[row, :len(tokens)] = torch.tensor(tokens)
        new_valid[row, :len(tokens)] = True
        target_ids[row, :len(wanted)] = torch.tensor(wanted)
    lengths = torch.tensor(contexts)
    sharer_head, receiver_head = torch.tensor(heads).T
    tensors = (sharer_ids, sharer_valid, receiver_ids, receiver_valid, lengths, sharer_head, receiver_head, new_ids,
               new_valid, target_ids)
    return TransferBatch(*(t.to(device) for t in tensors))


def projected_past(receiver, sharer, projector, batch: TransferBatch) -> torch.Tensor:
    """The receiver's past (L_r, 2, b, H_r, R, D_r): its own K/V of the head, the projected sharer K/V over
    the context slots (the last context_len slots of each row). Both models frozen; differentiable in the
    projector."""
    with torch.no_grad():
        mine = capture_kv(receiver, batch.receiver_ids, batch.receiver_valid)  # head slots are kept
        theirs = capture_kv(sharer, batch.sharer_ids, batch.sharer_valid)
    width = int(batch.context_len.max())
    slot = torch.arange(width, device=batch.context_len.device)[None]  # (1, C)
    first = width - batch.context_len[:, None]  # (b, 1) the row's first context slot among the last C
    is_context = slot >= first  # (b, C)
    index = (slot - first).clamp(min=0)  # (b, C) context token index (0 outside the context)
    projected = projector(theirs[:, :, :, :, -width:], batch.sharer_head[:, None] + index,
                          batch.receiver_head[:, None] + index)  # (L_r, 2, b, H_r, C, D_r)
    tail = torch.where(is_context[None, None, :, None, :, None], projected.to(mine.dtype), mine[:, :, :, :, -width:])
    return torch.cat([mine[:, :, :, :, :-width], tail], dim=4)


def transfer_loss(receiver, sharer, projector, batch: TransferBatch) -> torch.Tensor:
    """Mean next-token loss of the answer tokens, the receiver attending to its head and the projected context."""
    past = projected_past(receiver, sharer, projector, batch)
    start = batch.receiver_valid.sum(-1)  # (b,) the tail's first position: head + context
    dtype = receiver.output_weight.dtype
    logits = forward_after_past(receiver, past.to(dtype), batch.receiver_valid, start, batch.new_ids,
                                batch.new_valid)  # (b, W, V)
    return F.cross_entropy(logits.float().transpose(1, 2), batch.targets, ignore_index=IGNORE)
