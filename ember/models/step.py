"""The step context: everything one forward pass needs besides the weights, built by the caller.

The decoder consumes a `Step` and imports nothing from the engine. The engine builds steps over its KV cache
(positions, write slots, masks); training builds a cache-free causal step with `causal_step`. A step also says
which layers to run, which layers' input hidden states to return, optional per-layer key masks, and
optional hooks: one per layer on the new K/V (rewrite), one per layer on the queries (read-only probes).
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


AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
KVHook = Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
QueryHook = Callable[[int, torch.Tensor, torch.Tensor, object], None]


@dataclass
class Step:
    """One forward pass over T new tokens of b rows.

    positions  (b, T) rotary positions of the new tokens.
    kv         the K/V store written and read (None: the new tokens attend only to each other).
    slots      where the store writes (an int start slot, or a device tensor for fixed-shape steps).
    mask       attention mask over (queries, keys): a bool tensor (b, 1, T, S) True where visible, or a
               torch attention bias object; None with `causal` means plain causal attention.
    causal     with mask None: causal attention (queries and keys aligned at slot 0).
    layer_mask per-layer key visibility (L, b, 1, 1 or T, S) bool (L = every layer of the model, indexed by
               layer number), AND-ed into `mask` in layer l as mask & layer_mask[l]; `mask` must then be a
               bool tensor. Keys beyond the S the layer attends to are ignored (a mask built over a whole
               cache capacity fits a shorter view). None: every layer uses `mask` as is.
    layers     [start, stop) of the layers to run; None runs them all.
    capture    layers whose input hidden states are returned (a layer index equal to num_layers returns the
               final hidden states before the norm).
    kv_hook    called as hook(layer, k, v) -> (k, v) between RoPE and the cache write, k and v (b, H_kv, T, D).
    query_hook called as hook(layer, q, keys, mask) just before attention, returning nothing (read-only: it
               must not modify its arguments): q (b, H, T, D) after q_norm and RoPE, keys (b, H_kv, S, D)
               everything the queries attend to (cache and new keys, after kv_hook), and the mask actually
               used: a bool tensor (b, 1, T, S) with `layer_mask` already applied, an attention bias object,
               or None (then causal attention if `causal`, else every key is visible). Lets a caller compute
               attention probabilities per layer, softmax(q k^T / sqrt(D)) over visible keys. Under gradient
               checkpointing it is called again when a layer is recomputed in the backward pass.
    logits     "all" (b, T, V), "last" (b, 1, V) or "none"; only computed when the range ends at the last layer.
    attend     called as attend(layer, q, keys, values) -> out (b, H, T, D) in place of attention over what the
               store's `write` returned, with its own masks: a store that keeps some K/V elsewhere (a prompt
               region shared by a prompt's candidates) attends over all of it. `mask` must then be None, and
               `layer_mask` and `query_hook` are refused (they see only the keys `write` returns).
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
    layer_mask: torch.Tensor | None = None
    query_hook: QueryHook | None = None
    attend: AttendFn | None = None

    def __post_init__(self):
        if self.logits not in ("all", "last", "none"):
            raise StepError(f"Step.logits: expected 'all', 'last' or 'none', found {self.logits!r}")
        if self.attend is not None and (self.mask is not None or self.layer_mask is not None
                                        or self.query_hook is not None):
            raise StepError("Step.attend: expected no mask, layer_mask or query_hook beside it (it attends with "
                            "its own masks over K/V the others never see)")
        if self.layer_mask is not None:
            if not isinstance(self.layer_mask, torch.Tensor) or self.layer_mask.dtype != torch.bool \
                    or self.layer_mask.dim() != 5:
                found = (f"{self.layer_mask.dtype} of shape {tuple(self.layer_mask.shape)}"
                         if isinstance(self.layer_mask, torch.Tensor) else type(self.layer_mask).__name__)
                raise StepError(f"Step.layer_mask: expected a bool tensor (L, b, 1, 1, S), found {found}")
            if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool:
                found = (f"a {self.mask.dtype} tensor" if isinstance(self.mask, torch.Tensor)
                         else type(self.mask).__name__)
                raise StepError(f"Step.layer_mask: needs `mask` as a bool tensor (b, 1, T, S) to AND into, "
                                f"found {found}")


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
