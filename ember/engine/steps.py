"""The step builder: turns 'append these tokens to this cache' into the `Step` the decoder consumes.

It claims cache slots, derives rotary positions from each row's next position, and picks the cheapest
correct attention mask (none, causal, lower-right causal after cached slots, or an explicit boolean mask).
A cache with per-layer key validity (`KVCache.layer_valid`) always gets explicit masks, plus the per-layer
`layer_mask` the decoder ANDs into them.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from ember.engine.cache import KVCache
from ember.models.step import Step


def append_step(cache: KVCache, rows: int, steps: int, valid: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, **kwargs) -> Step:
    """A step appending `steps` tokens of `rows` rows (rows dividing the cache batch) at the cache cursor.

    `valid` (rows, steps) marks real tokens (False for left padding); `positions` (rows, steps) overrides the
    rotary positions (default: continue each row's next position). Extra keyword arguments go to `Step`.
    """
    start, positions = cache.reserve(rows, steps, valid, positions)
    attend = cache.attention_at(start)
    if attend is not None:  # the cache attends itself (its masks are its own)
        return Step(positions=positions, kv=cache, slots=start, mask=None, causal=False, attend=attend, **kwargs)
    mask, causal = attention_mask(cache, rows, start, steps)
    if cache.layer_valid is not None:
        kwargs["layer_mask"] = cache.layer_key_mask(rows, start + steps)[:, :, None, None, :]  # (L, b, 1, 1, S')
    return Step(positions=positions, kv=cache, slots=start, mask=mask, causal=causal, **kwargs)


def static_step(cache: KVCache, **kwargs) -> Step:
    """A one-token step over every cache row with fixed shapes and device-side bookkeeping only (capturable
    in a CUDA graph). After running it, call `cache.advance_static()` and advance `cache.length` by one."""
    positions = cache.reserve_static()  # (B, 1)
    attend = cache.attention_at(None)
    if attend is not None:
        return Step(positions=positions, kv=cache, slots=cache.static_slot(), mask=None, causal=False, attend=attend,
                    **kwargs)
    mask = cache.key_valid[:, None, None, :]  # (B, 1, 1, S)
    if cache.layer_valid is not None:
        kwargs["layer_mask"] = cache.layer_valid[:, :, None, None, :]  # (L, B, 1, 1, S)
    return Step(positions=positions, kv=cache, slots=cache.slot, mask=mask, causal=False, **kwargs)


def attention_mask(cache: KVCache, rows: int, start: int, steps: int):
    """Mask for queries at slots [start, start+T) over keys [0, start+T): (mask | None, is_causal).

    Without padding, causal attention needs no explicit mask (fast kernels): none for one query, `is_causal`
    from slot 0, a lower-right causal bias after cached slots. With padding (which a cache with per-layer key
    validity always reports: its layer masks need a boolean mask to AND into), a query may see valid keys at
    or before its slot; it always sees itself so a padding query never has an empty row.
    """
    end = start + steps
    if not cache.has_padding:
        if steps == 1:
            return None, False
        if start == 0:
            return None, True
        return causal_lower_right(steps, end), False  # after a reused prefix: fused kernels still apply
    device = cache.key_valid.device
    query_slot = torch.arange(start, end, device=device)[:, None]  # (T, 1)
    key_slot = torch.arange(end, device=device)[None, :]  # (1, S')
    visible = (key_slot <= query_slot)[None] & cache.key_mask(rows, end)[:, None, :]  # (b, T, S')
    visible |= (key_slot == query_slot)[None]
    return visible[:, None], False
