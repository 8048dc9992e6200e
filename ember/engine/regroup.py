"""Re-forming a decode batch from rows of other caches: what continuous batching does when prompt groups
finish (their rows leave the batch) and waiting requests are prefilled (their rows join it).

Each row keeps only its valid K/V (prompt padding and unwritten slots are dropped), placed right-aligned so
every row ends at the new cursor; rotary positions were applied when the K/V was computed and each row keeps
its next position, so a row decodes on exactly as it would have in its old cache.
"""

from __future__ import annotations

from typing import Callable

from ember.engine.cache import KVCache
from ember.errors import GenerationError


def regroup(sources: list[tuple[KVCache, int]], extra_capacity: int,
            new_cache: Callable[[int, int], KVCache]) -> KVCache:
    """A cache whose row i is row `sources[i][1]` of cache `sources[i][0]` (its valid slots, in order), with
    room for `extra_capacity` more tokens per row."""
    if not sources:
        raise GenerationError("regroup: expected at least one row, found none")
    spans = []
    for cache, row in sources:
        if cache.layer_valid is not None:
            raise GenerationError("regroup: rows with per-layer key validity cannot move between caches")
        spans.append(cache.key_valid[row].nonzero()[:, 0])  # (m,) the row's valid slots
    width = max(len(slots) for slots in spans)
    merged = new_cache(len(sources), width + extra_capacity)
    for index, ((cache, row), slots) in enumerate(zip(sources, spans)):
        kv = cache.read(row, slots)  # (L, 2, H, m, D)
        merged.load(slice(index, index + 1), width - len(slots), kv, int(cache.next_position[row]))
    merged.skip_to(width)
    merged.versions = [cache.versions[row] for cache, row in sources]
    return merged
