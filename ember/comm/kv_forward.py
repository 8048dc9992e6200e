"""Cache-free forwards for fuser training: read a batch's post-RoPE K/V with a K/V hook, and run the receiver
over new tokens attending to a given (differentiable) past K/V.

Batches are left-padded: `valid` (b, T) marks real tokens, positions count real tokens only, padded keys are
hidden. A past of P slots has its own validity (b, P); the new tokens continue each row's positions.
"""

from __future__ import annotations

import torch

from ember.models.step import Step, causal_step


def capture_kv(model, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """K/V (L, 2, b, H, T, D) of ids (b, T) read in one causal pass (no logits); keys where `valid` is False
    are hidden from every query."""
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(index, k, v):
        layers.append((k, v))
        return k, v

    step = causal_step(tuple(ids.shape), valid, kv_hook=keep, logits="none")
    model.run(step, input_ids=ids)
    return torch.stack([torch.stack(kv) for kv in layers])


class PastStore:
    """A KVStore whose keys and values are a fixed past (L, 2, b, H, P, D) followed by the step's own."""

    def __init__(self, past: torch.Tensor):
        self.past = past

    def write(self, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.past[layer, 0].to(k.dtype), k], dim=2), torch.cat([self.past[layer, 1].to(v.dtype), v], dim=2)


def forward_after_past(model, past: torch.Tensor, past_valid: torch.Tensor, start: torch.Tensor, ids: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """Logits (b, W, V) of new tokens ids (b, W) (real where `valid`, right padding allowed) at positions
    start (b,) + 0.., attending to the past's valid slots (b, P) and causally to each other; differentiable
    in the past."""
    rows, width = ids.shape
    slots = past.shape[4]
    index = torch.arange(width, device=ids.device)
    positions = start[:, None] + index[None, :]  # (b, W): right padding, so real tokens come first
    causal = (index[None, :] <= index[:, None])[None] & valid[:, None, :]  # (b, W, W)
    causal |= torch.eye(width, dtype=torch.bool, device=ids.device)[None]
    seen = past_valid[:, None, :].expand(rows, width, slots)  # (b, W, P)
    mask = torch.cat([seen, causal], dim=-1)[:, None]  # (b, 1, W, P + W)
    step = Step(positions=positions, kv=PastStore(past), slots=0, mask=mask, causal=False)
    return model.run(step, input_ids=ids).logits
