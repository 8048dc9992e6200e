"""Refreshing cached K/V after a weight update, in place in the prefix cache (what a cache policy asks for).

Two operations, both over the cached blocks of one model, parents before children:

* `recompute_from_boundary`: layers >= N are run again from the stored input hidden states of layer N (valid
  when only layers >= N changed), attending to the already refreshed K/V of each block's ancestors. Exact.
* `correct_with_delta`: K and V of adapted layers are corrected with the low-rank change of the adapter applied
  to the stored input hidden states of those layers: for the k projection x -> delta_B delta_A x, rotated at the
  block's positions and added to the cached keys (RoPE is linear); for v the same without rotation. Exact where
  the stored inputs are still valid (the first changed layer); deeper layers' inputs are stale.
"""

from __future__ import annotations

import torch

from ember.engine.cache import KVCache
from ember.engine.steps import append_step
from ember.errors import GenerationError
from ember.models.lora import LoraAdapter
from ember.models.rotary import apply_rope, rope_cos_sin


def _boundary_index(prefix_cache, layer: int) -> int:
    if layer not in prefix_cache.boundary_layers:
        raise GenerationError(f"refresh: expected boundary hidden states of layer {layer} in the prefix cache, found "
                              f"boundary_layers={prefix_cache.boundary_layers}")
    return prefix_cache.boundary_layers.index(layer)


@torch.inference_mode()
def recompute_from_boundary(model, prefix_cache, fingerprint: str, layer: int, max_rows: int = 64) -> int:
    """Recompute the K/V of layers [layer, L) of every cached block of the model `fingerprint` from the stored
    input hidden states of `layer`. Returns the number of tokens recomputed (each block once).

    Chains run batched, in waves: a wave takes up to `max_rows` chains none of whose blocks to do another chain
    of the wave also needs, so a shared prefix is computed once (in the first wave) and the chains below it
    together next.
    """
    if layer >= model.config.num_layers:
        return 0
    index = _boundary_index(prefix_cache, layer)
    done, tokens = set(), 0
    pending = prefix_cache.paths(fingerprint)
    while pending:
        wave, claimed, later = [], set(), []
        for chain in pending:
            first = next((d for d, block in enumerate(chain) if block.key not in done), len(chain))
            todo = {block.key for block in chain[first:]}
            if not todo:
                continue
            if todo & claimed or len(wave) == max_rows:
                later.append(chain)
            else:
                claimed |= todo
                wave.append((chain, first))
        tokens += _recompute_wave(model, prefix_cache, wave, layer, index)
        done |= claimed
        pending = later
    return tokens


def _recompute_wave(model, prefix_cache, wave, layer: int, index: int) -> int:
    """One batched pass of layers [layer, L) over the chains of a wave, each (chain, first block to do).

    Slot layout per row, as in prefill: [pad | refreshed prefix | pad | blocks to do], prefixes right-aligned
    below `head` and the blocks to do left-padded to `width`; each row's positions continue its prefix.
    """
    config, size = model.config, prefix_cache.block_size
    weight = model.output_weight
    reused = [first * size for _, first in wave]
    todo = [len(chain) * size - r for (chain, _), r in zip(wave, reused)]
    head, width = max(reused), max(todo)
    cache = KVCache(config, len(wave), head + width, weight.dtype, weight.device)
    hidden = torch.zeros(len(wave), width, config.hidden_size, dtype=weight.dtype, device=weight.device)
    valid = torch.zeros(len(wave), width, dtype=torch.bool, device=weight.device)  # (n, W)
    for row, ((chain, first), prefix, count) in enumerate(zip(wave, reused, todo)):
        if prefix:
            kv = torch.cat([b.kv for b in chain[:first]], dim=3)  # (L, 2, H, prefix, D), refreshed already
            cache.load(slice(row, row + 1), head - prefix, kv, prefix)
        hidden[row, width - count:] = torch.cat([b.hidden[index] for b in chain[first:]], dim=0)
        valid[row, width - count:] = True
    cache.skip_to(head)
    step = append_step(cache, len(wave), width, valid, layers=(layer, config.num_layers), logits="none")
    model.run(step, hidden=hidden)
    for row, ((chain, first), count) in enumerate(zip(wave, todo)):
        fresh = cache.storage[layer:, :, row, :, head + width - count:]  # (L - layer, 2, H, count, D)
        for offset, block in enumerate(chain[first:]):
            block.kv[layer:] = fresh[:, :, :, offset * size:(offset + 1) * size]
    return sum(todo)


def lora_delta(old: LoraAdapter | None, new: LoraAdapter | None, name: str, dtype=torch.float32):
    """The change of one projection's low-rank term from `old` to `new` as factors (delta_A (q, in), delta_B
    (out, q)) with delta_B @ delta_A = s_new B_new A_new - s_old B_old A_old (q = the two ranks summed), or
    None when the projection is unchanged or unadapted in both."""
    pairs = []
    for adapter, sign in ((new, 1.0), (old, -1.0)):
        if adapter is not None and name in adapter.weights:
            a, b = adapter.weights[name]
            pairs.append((a.to(dtype), b.to(dtype) * (sign * adapter.scales[name])))
    if not pairs or (len(pairs) == 2 and all(torch.equal(x, y) for x, y in zip(pairs[0], (pairs[1][0], -pairs[1][1])))):
        return None
    return torch.cat([a for a, _ in pairs], dim=0), torch.cat([b for _, b in pairs], dim=1)


def changed_kv_layers(old: LoraAdapter | None, new: LoraAdapter | None, num_layers: int) -> list[int]:
    """Layers whose k or v projection computes differently under `new` than under `old`."""
    return [layer for layer in range(num_layers)
            if any(lora_delta(old, new, f"model.layers.{layer}.self_attn.{p}") is not None for p in ("k_proj", "v_proj"))]


@torch.inference_mode()
def correct_with_delta(model, prefix_cache, fingerprint: str, old: LoraAdapter | None, new: LoraAdapter | None,
                       layers: list[int]) -> int:
    """Correct the cached K and V of `layers` for the adapter change old -> new from their stored input hidden
    states. Models with a key norm (qwen3) get their keys recomputed through the new k projection (the norm is
    not linear); values are always corrected with the delta. The delta is computed in fp32 and added in the
    cache's dtype (exact in fp32; bf16 caches round once more). Returns tokens x layers corrected."""
    config, size = model.config, prefix_cache.block_size
    placed = {}  # block key -> (block, its first token's position): each block once
    for chain in prefix_cache.paths(fingerprint):
        for depth, block in enumerate(chain):
            placed.setdefault(block.key, (block, depth * size))
    if not placed:
        return 0
    blocks, starts = [b for b, _ in placed.values()], [start for _, start in placed.values()]
    device = blocks[0].kv.device
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(size, device=device)  # (n, block)
    cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, torch.float32)  # (n, 1, block, D)
    for layer in layers:
        index = _boundary_index(prefix_cache, layer)
        attention = model.model.layers[layer].self_attn
        x = model.model.layers[layer].input_layernorm(torch.stack([b.hidden[index] for b in blocks]))  # (n, block, h)
        deltas = {p: lora_delta(old, new, f"model.layers.{layer}.self_attn.{p}") for p in ("k_proj", "v_proj")}
        keys = [b.kv[layer, 0] for b in blocks]  # views (H, block, D)
        if attention.k_norm is not None and deltas["k_proj"] is not None:
            k = attention.k_norm(_split_heads(attention.k_proj(x), config))  # new adapter bound: the full projection
            torch._foreach_copy_(keys, list(apply_rope(k, cos.to(k.dtype), sin.to(k.dtype)).unbind(0)))
        elif deltas["k_proj"] is not None:
            change = apply_rope(_split_heads(_low_rank(x, deltas["k_proj"]), config), cos, sin)  # (n, H, block, D)
            torch._foreach_add_(keys, list(change.to(keys[0].dtype).unbind(0)))
        if deltas["v_proj"] is not None:
            change = _split_heads(_low_rank(x, deltas["v_proj"]), config)  # (n, H, block, D)
            torch._foreach_add_([b.kv[layer, 1] for b in blocks], list(change.to(keys[0].dtype).unbind(0)))
    return len(blocks) * size * len(layers)


def _low_rank(x: torch.Tensor, delta) -> torch.Tensor:
    """delta_B (delta_A x) in fp32: (..., out)."""
    a, b = delta
    return (x.float() @ a.to(x.device).t()) @ b.to(x.device).t()


def _split_heads(flat: torch.Tensor, config) -> torch.Tensor:
    """(n, block, H * D) -> (n, H, block, D)."""
    return flat.view(*flat.shape[:2], config.num_kv_heads, config.head_dim).transpose(1, 2)
