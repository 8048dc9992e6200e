"""The step context: everything one forward pass needs besides the weights, built by the caller.

The decoder consumes a `Step` and imports nothing from the engine. The engine builds steps over its KV cache
(positions, write slots, masks); training builds a cache-free causal step with `causal_step`. A step also says
which layers to run, which layers' input hidden states to return, and an optional per-layer K/V hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ember.errors import StepError


class KVStore(Protocol):
    """Where a forward pass writes its new K/V and reads every key and value it attends to."""

    def write(self, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, H_kv, T, D) at `slots`; return all keys and values the queries attend to."""
        ...


KVHook = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class Step:
    """One forward pass over T new tokens of b rows.

    positions  (b, T) rotary positions of the new tokens.
    kv         the K/V store written and read (None: the new tokens attend only to each other).
    slots      where the store writes (an int start slot, or a device tensor for fixed-shape steps).
    mask       attention mask over (queries, keys): a bool tensor (b, 1, T, S) True where visible, or a
               torch attention bias object; None with `causal` means plain causal attention.
    causal     with mask None: causal attention (queries and keys aligned at slot 0).
    layers     [start, stop) of the layers to run; None runs them all.
    capture    layers whose input hidden states are returned (a layer index equal to num_layers returns the
               final hidden states before the norm).
    kv_hook    called as hook(layer, k, v) -> (k, v) between RoPE and the cache write, k and v (b, H_kv, T, D).
    logits     "all" (b, T, V), "last" (b, 1, V) or "none"; only computed when the range ends at the last layer.
    """

    positions: torch.Tensor
    kv: KVStore | None = None
    slots: int | torch.Tensor | None = None
    mask: object | None = None
    causal: bool = True
    layers: tuple[int, int] | None = None
    capture: tuple[int, ...] = ()
    kv_hook: KVHook | None = None
    logits: str = "all"

    def __post_init__(self):
        if self.logits not in ("all", "last", "none"):
            raise StepError(f"Step.logits: expected 'all', 'last' or 'none', found {self.logits!r}")


@dataclass
class StepOutput:
    """What a forward pass returns: logits (or None), the hidden states after the last layer run (b, T, hidden),
    and the captured input hidden states {layer: (b, T, hidden)}."""

    logits: torch.Tensor | None
    hidden: torch.Tensor
    boundary: dict[int, torch.Tensor] = field(default_factory=dict)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions (b, T) of left-padded rows: each real token's index among its row's real tokens
    (padding takes the position of the next real token)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_step(input_shape: tuple[int, int], attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, device=None, **kwargs) -> Step:
    """A cache-free step over (b, T) tokens: causal attention, keys hidden where `attention_mask` (b, T) is 0.

    Positions default to `positions_from_mask` (left padding) or 0..T-1. A query always sees itself, so a
    padding query never has an empty row. Extra keyword arguments go to `Step`.
    """
    rows, steps = input_shape
    if positions is None:
        positions = (positions_from_mask(attention_mask) if attention_mask is not None
                     else torch.arange(steps, device=device).expand(rows, steps))
    if attention_mask is None:
        return Step(positions=positions, mask=None, causal=True, **kwargs)
    index = torch.arange(steps, device=attention_mask.device)
    visible = (index[None, :] <= index[:, None])[None] & attention_mask.bool()[:, None, :]  # (b, T, T)
    visible |= torch.eye(steps, dtype=torch.bool, device=attention_mask.device)[None]
    return Step(positions=positions, mask=visible[:, None], causal=False, **kwargs)
