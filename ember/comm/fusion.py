"""Shared-context fusion: sharer and receiver read the same prompt; the fuser rewrites the receiver's K/V of
every prompt token but the last from both caches; the last prompt token and the answer attend to the result.

`fusion_batch` builds the padded tensors of a batch (the sharer's tokens aligned one per receiver token),
`fused_past` runs both frozen models and the fuser, `fusion_loss` is the training objective (next-token loss
of the receiver's answer tokens) and `engine_pasts` hands the fused cache to `Engine.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.comm.align import align_prompt
from ember.comm.kv_forward import capture_kv, forward_after_past
from ember.engine.past import PastKV
from ember.errors import CommError


@dataclass(frozen=True)
class FusionExample:
    """A prompt (chat messages, read by both models) and the receiver's answer text ('' at evaluation)."""

    item_id: str
    messages: tuple
    answer: str = ""


@dataclass
class FusionBatch:
    """Left-padded prompts (b, n): receiver ids and validity, the aligned sharer ids and validity; right-padded
    answers (b, A) with validity (A = 0 without answers)."""

    receiver_ids: torch.Tensor
    receiver_valid: torch.Tensor
    sharer_ids: torch.Tensor
    sharer_valid: torch.Tensor
    answer_ids: torch.Tensor
    answer_valid: torch.Tensor


def fusion_batch(examples: list[FusionExample], receiver_tok, sharer_tok, device) -> FusionBatch:
    """The batch tensors of examples (answers end with the receiver's end-of-sequence token)."""
    if not examples:
        raise CommError("fusion batch: expected at least one example, found none")
    aligned = [align_prompt(receiver_tok, sharer_tok, list(ex.messages)) for ex in examples]
    if any(len(a.receiver_ids) < 2 for a in aligned):
        raise CommError("fusion batch: expected prompts of at least 2 tokens (all but the last are fused)")
    eos = [receiver_tok.eos_token_id] if receiver_tok.eos_token_id is not None else []
    answers = [receiver_tok.encode(ex.answer) + eos if ex.answer else [] for ex in examples]
    rows, width, answer_width = len(examples), max(len(a.receiver_ids) for a in aligned), max(map(len, answers))
    r_ids = torch.zeros(rows, width, dtype=torch.long)
    s_ids = torch.zeros(rows, width, dtype=torch.long)
    r_valid = torch.zeros(rows, width, dtype=torch.bool)
    s_valid = torch.zeros(rows, width, dtype=torch.bool)
    a_ids = torch.zeros(rows, answer_width, dtype=torch.long)
    a_valid = torch.zeros(rows, answer_width, dtype=torch.bool)
    for row, (a, answer) in enumerate(zip(aligned, answers)):
        n = len(a.receiver_ids)
        r_ids[row, width - n:] = torch.tensor(a.receiver_ids)
        s_ids[row, width - n:] = torch.tensor(a.sharer_ids)
        r_valid[row, width - n:] = True
        s_valid[row, width - n:] = torch.tensor(a.sharer_valid)
        if answer:
            a_ids[row, :len(answer)] = torch.tensor(answer)
            a_valid[row, :len(answer)] = True
    return FusionBatch(*(t.to(device) for t in (r_ids, r_valid, s_ids, s_valid, a_ids, a_valid)))


def fused_past(receiver, sharer, fuser, batch: FusionBatch, projection_only: bool = False):
    """Fused K/V (L_r, 2, b, H, n-1, D) of every prompt token but the last, and its validity (b, n-1). Both
    models are frozen (no gradient); the fuser's output is differentiable."""
    with torch.no_grad():
        mine = capture_kv(receiver, batch.receiver_ids[:, :-1], batch.receiver_valid[:, :-1])
        seen = batch.sharer_valid[:, :-1] & batch.receiver_valid[:, :-1]
        theirs = capture_kv(sharer, batch.sharer_ids[:, :-1], seen)
        theirs = theirs * seen[None, None, :, None, :, None].to(theirs.dtype)  # invalid sharer tokens send zeros
    fuser_dtype = next(fuser.parameters()).dtype
    fused = fuser(mine.to(fuser_dtype), theirs.to(fuser_dtype), projection_only=projection_only)
    return fused, batch.receiver_valid[:, :-1]


def fusion_loss(receiver, sharer, fuser, batch: FusionBatch) -> torch.Tensor:
    """Mean next-token loss of the receiver's answer tokens after the last prompt token, attending to the
    fused cache (gradients reach the fuser only)."""
    if batch.answer_ids.shape[1] == 0:
        raise CommError("fusion loss: expected examples with answers, found none")
    fused, past_valid = fused_past(receiver, sharer, fuser, batch)
    new_ids = torch.cat([batch.receiver_ids[:, -1:], batch.answer_ids[:, :-1]], dim=1)  # (b, A)
    new_valid = torch.cat([torch.ones_like(batch.answer_valid[:, :1]), batch.answer_valid[:, :-1]], dim=1)
    start = past_valid.sum(-1)  # (b,) position of the last prompt token
    dtype = receiver.output_weight.dtype
    logits = forward_after_past(receiver, fused.to(dtype), past_valid, start, new_ids, new_valid)  # (b, A, V)
    losses = F.cross_entropy(logits.float().transpose(1, 2), batch.answer_ids, reduction="none")  # (b, A)
    weights = batch.answer_valid.float()
    return (losses * weights).sum() / weights.sum()


def engine_pasts(fused: torch.Tensor, valid: torch.Tensor, dtype) -> list[PastKV]:
    """One PastKV per row from a fused cache (L, 2, b, H, n-1, D) and its validity (b, n-1): the row's real
    slots, the last prompt token continuing after them."""
    pasts = []
    for row in range(fused.shape[2]):
        keep = valid[row].nonzero()[:, 0].to(fused.device)
        kv = fused[:, :, row].index_select(3, keep).to(dtype)  # (L, 2, H, m, D)
        pasts.append(PastKV(kv.detach(), len(keep)))
    return pasts


def last_tokens(batch: FusionBatch) -> list[list[int]]:
    """Each row's last prompt token, the prompt `Engine.generate` continues after the fused past."""
    return [[int(t)] for t in batch.receiver_ids[:, -1].tolist()]
