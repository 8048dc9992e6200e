"""Prefill of a batch of prompts into a fresh KVCache, reusing cached prefixes where a PrefixCache has them.

Slot layout of a batch (one row group per prompt, `group` candidate rows each):

    [ pad | reused prefix (copied from the prefix cache) | pad | computed suffix ]
    0        head - m_i                                   head   head + width - s_i        head + width

Reused prefixes are right-aligned below `head` (the longest reuse) and suffixes left-padded to `width`, so the
forward pass runs once over the suffix columns. Each row's next position after loading is its reused token
count, so a reused block's K/V (computed at positions 0..m-1) is exactly what a full prefill would produce.
Only blocks valid at every layer under the weights in use (`versions`) are reused.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch

from ember.engine.cache import KVCache
from ember.engine.past import PastKV
from ember.engine.prefix_cache import PrefixCache, PrefixMatch
from ember.engine.shared_cache import cache_maker
from ember.engine.steps import append_step
from ember.errors import GenerationError
from ember.models.versions import LayerVersions

NewCache = Callable[..., KVCache]  # (batch, capacity[, group=, prompt_slots=]) -> an empty cache


def prefill(model, prompts: list[list[int]], group: int, extra_capacity: int, pad_id: int, new_cache: NewCache,
            versions: LayerVersions, prefix_cache: PrefixCache | None = None,
            pasts: list[PastKV] | None = None, share_prompt: bool = False) -> tuple[KVCache, torch.Tensor]:
    """Prefill `prompts` once each into a cache of len(prompts) * group rows with room for `extra_capacity`
    more tokens. Returns the cache and last-token logits (len(prompts), V).

    `share_prompt` (with group > 1 and no pasts) stores each prompt's K/V once for its group of rows: the cache
    is then `new_cache(batch, capacity, group=, prompt_slots=)`, a `SharedPromptCache` whose prompt region
    holds at least the prompt slots (the caller calls its `start_decode` before decoding).

    `pasts` (one per prompt, or None) places given K/V before each prompt in the reused-prefix slots, the
    prompt continuing at the past's next position (a past's `layer_valid` hides its tokens from single layers);
    the prefix cache is not used then."""
    if pasts is not None:
        if len(pasts) != len(prompts):
            raise GenerationError(f"pasts: expected one per prompt ({len(prompts)}), found {len(pasts)}")
        prefix_cache = None
    if prefix_cache is not None:
        warm_shared_prefixes(model, prompts, pad_id, prefix_cache, versions)
    if share_prompt and group > 1 and pasts is None and extra_capacity > 0:
        make = new_cache
        new_cache = lambda batch, capacity: make(  # noqa: E731
            batch, capacity, group=group, prompt_slots=capacity - extra_capacity)
    return _prefill(model, prompts, group, extra_capacity, pad_id, new_cache, versions, prefix_cache, pasts)


def _prefill(model, prompts, group, extra_capacity, pad_id, new_cache, versions, prefix_cache, pasts=None):
    device = model.output_weight.device
    matches = [prefix_cache.match(p, versions) if prefix_cache is not None else PrefixMatch(0, []) for p in prompts]
    try:
        heads = [m.tokens for m in matches] if pasts is None else [past.tokens for past in pasts]
        head = max(heads)
        suffixes = [p[m.tokens:] for p, m in zip(prompts, matches)]
        width = max(map(len, suffixes))
        cache = new_cache(len(prompts) * group, head + width + extra_capacity)
        for index, match in enumerate(matches):
            rows = slice(index * group, (index + 1) * group)
            if pasts is not None:
                past = pasts[index]
                cache.load(rows, head - heads[index], past.kv, past.next_position, past.layer_valid)
            elif pasts is None and match.tokens:
                cache.load(rows, head - match.tokens, PrefixCache.gather(match), match.tokens)
        if head:
            cache.skip_to(head)
        cache.versions = [versions] * cache.batch
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (P, W) left-padded suffixes
        valid = torch.zeros((len(prompts), width), dtype=torch.bool)
        for index, suffix in enumerate(suffixes):
            ids[index, width - len(suffix):] = torch.tensor(suffix)
            valid[index, width - len(suffix):] = True
        boundary = prefix_cache.boundary_layers if prefix_cache is not None else ()
        if boundary and not 0 <= boundary[0] <= boundary[-1] <= model.config.num_layers:
            raise GenerationError(f"PrefixCache.boundary_layers: expected layers in [0, {model.config.num_layers}] "
                                  f"for this model, found {boundary}")
        step = append_step(cache, len(prompts), width, valid.to(device), logits="last", capture=boundary)
        out = model.run(step, input_ids=ids.to(device))
        if prefix_cache is not None:
            hidden = torch.stack([out.boundary[layer] for layer in boundary], dim=1) if boundary else None
            for index, (prompt, match) in enumerate(zip(prompts, matches)):
                slots = _prompt_slots(len(prompt), match.tokens, head, width)
                columns = slots - head  # suffix columns of the forward (negative for reused tokens)
                prefix_cache.insert(
                    prompt, versions, lambda a, b, i=index, s=slots: cache.read(i * group, s[a:b]),
                    None if hidden is None else lambda a, b, i=index, c=columns: _boundary(hidden, i, c[a:b]))
    finally:
        if prefix_cache is not None:
            for match in matches:
                prefix_cache.release(match)
    return cache, out.logits[:, -1]  # (P, V)


def _boundary(hidden: torch.Tensor, row: int, columns: torch.Tensor) -> torch.Tensor:
    """Boundary states (n, m, hidden) of one prompt's tokens at suffix `columns` of hidden (P, n, W, hidden)
    (blocks are only stored from tokens computed in this pass, never from reused ones)."""
    return hidden[row].index_select(1, columns.to(hidden.device))


def _prompt_slots(length: int, reused: int, head: int, width: int) -> torch.Tensor:
    """Cache slot of each prompt token (length,) under the layout in the module docstring."""
    prefix = torch.arange(head - reused, head)
    suffix = torch.arange(head + width - (length - reused), head + width)
    return torch.cat([prefix, suffix])


def warm_shared_prefixes(model, prompts: list[list[int]], pad_id: int, prefix_cache: PrefixCache,
                         versions: LayerVersions) -> int:
    """Prefill, once, each block-aligned prefix that two or more prompts of the batch share and the cache
    lacks, so the batch reuses it instead of computing it per prompt. Returns the number of prefixes warmed."""
    size = prefix_cache.block_size
    chains = [prefix_cache.block_keys(p[:-1], versions) for p in prompts]
    counts = Counter(key for chain in chains for key in chain)
    targets = {}
    for prompt, chain in zip(prompts, chains):
        shared = [i for i, key in enumerate(chain) if counts[key] >= 2]
        if not shared:
            continue
        deepest = shared[-1]
        maximal = deepest + 1 == len(chain) or counts[chain[deepest + 1]] < 2
        if maximal and chain[deepest] not in targets:
            targets[chain[deepest]] = prompt[:(deepest + 1) * size]
    todo = [p for p in targets.values() if prefix_cache.cached_tokens(p, versions) < len(p)]
    if todo:
        _prefill(model, todo, 1, 0, pad_id, cache_maker(model), versions, prefix_cache)
    return len(todo)
