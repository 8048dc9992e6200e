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
def recompute_from_boundary(model, prefix_cache, fingerprint: str, layer: int) -> int:
    """Recompute the K/V of layers [layer, L) of every cached block of the model `fingerprint` from the stored
    input hidden states of `layer`. Returns the number of tokens recomputed (each once)."""
    config = model.config
    if layer >= config.num_layers:
        return 0
    index = _boundary_index(prefix_cache, layer)
    size, done, tokens = prefix_cache.block_size, set(), 0
    for chain in prefix_cache.paths(fingerprint):
        first = next((d for d, block in enumerate(chain) if block.key not in done), len(chain))
        todo = chain[first:]
        if not todo:
            continue
        reused = first * size
        cache = KVCache(config, 1, reused + len(todo) * size, model.output_weight.dtype, model.output_weight.device)
        if reused:
            cache.load(slice(0, 1), 0, torch.cat([b.kv for b in chain[:first]], dim=3), reused)  # refreshed above
            cache.skip_to(reused)
        hidden = torch.cat([b.hidden[index] for b in todo], dim=0)[None]  # (1, T, hidden)
        step = append_step(cache, 1, hidden.shape[1], layers=(layer, config.num_layers), logits="none")
        model.run(step, hidden=hidden)
        fresh = cache.storage[layer:, :, 0, :, reused:]  # (L - layer, 2, H, T, D)
        for offset, block in enumerate(todo):
            block.kv[layer:] = fresh[:, :, :, offset * size:(offset + 1) * size]
            done.add(block.key)
        tokens += len(todo) * size
    return tokens


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
    not linear); values are always corrected with the delta. Returns tokens x layers corrected."""
    config, size = model.config, prefix_cache.block_size
    blocks = {b.key: b for b in prefix_cache.blocks(fingerprint)}
    depth = {}
    for chain in prefix_cache.paths(fingerprint):
        depth.update({block.key: d for d, block in enumerate(chain)})
    work = 0
    for layer in layers:
        index = _boundary_index(prefix_cache, layer)
        attention = model.model.layers[layer].self_attn
        norm = model.model.layers[layer].input_layernorm
        deltas = {p: lora_delta(old, new, f"model.layers.{layer}.self_attn.{p}") for p in ("k_proj", "v_proj")}
        for key, block in blocks.items():
            x = norm(block.hidden[index])  # (block, hidden): the projections' input
            positions = torch.arange(depth[key] * size, (depth[key] + 1) * size, device=x.device)[None]  # (1, block)
            cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, torch.float32)
            if attention.k_norm is not None and deltas["k_proj"] is not None:
                flat = attention.k_proj(x)  # (block, H * D): the new adapter is bound, the full new projection
                k = attention.k_norm(flat.view(size, config.num_kv_heads, config.head_dim)).transpose(0, 1)
                block.kv[layer, 0] = apply_rope(k[None], cos.to(k.dtype), sin.to(k.dtype))[0]  # (H, block, D)
            elif deltas["k_proj"] is not None:
                change = _heads(_low_rank(x, deltas["k_proj"]), config)  # (H, block, D)
                block.kv[layer, 0] += apply_rope(change[None], cos, sin)[0].to(block.kv.dtype)
            if deltas["v_proj"] is not None:
                block.kv[layer, 1] += _heads(_low_rank(x, deltas["v_proj"]), config).to(block.kv.dtype)
            work += size
    return work


def _low_rank(x: torch.Tensor, delta) -> torch.Tensor:
    """delta_B (delta_A x) in fp32: (block, out)."""
    a, b = delta
    return (x.float() @ a.to(x.device).t()) @ b.to(x.device).t()


def _heads(flat: torch.Tensor, config) -> torch.Tensor:
    """(block, H * D) -> (H, block, D)."""
    return flat.view(flat.shape[0], config.num_kv_heads, config.head_dim).transpose(0, 1).float()
