"""Prefix KV cache: block-granular reuse of prompt prefixes across prompts, candidates and calls.

Blocks of `block_size` tokens are keyed by a chained hash (parent block key, block tokens) rooted at the
model/adapter `version`, so an entry made by another version can never be matched. Each block holds its K/V
for all layers, (L, 2, H_kv, block, D). Entries have reference counts (blocks in use by a running batch are
never evicted), can be pinned, and are evicted least-recently-used, leaves first, under a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ember.errors import GenerationError


@dataclass
class PrefixStats:
    """Counters since the cache was created."""

    hits: int = 0  # requests that reused at least one block
    misses: int = 0  # requests that reused nothing
    tokens_reused: int = 0
    tokens_recomputed: int = 0
    evictions: int = 0
    inserts: int = 0
    insert_skipped: int = 0  # blocks not stored because nothing could be evicted

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Block:
    key: int
    parent: int | None
    tokens: tuple[int, ...]
    kv: torch.Tensor  # (L, 2, H, block, D)
    version: str
    refs: int = 0
    pinned: bool = False
    children: set = field(default_factory=set)


@dataclass
class PrefixMatch:
    """Cached blocks covering the first `tokens` tokens of a prompt; hold it until the K/V is copied out."""

    tokens: int
    blocks: list


class PrefixCache:
    """Block-granular prefix cache with LRU eviction under `max_bytes`."""

    def __init__(self, block_size: int = 16, max_bytes: int = 1 << 30):
        if block_size < 1 or max_bytes < 0:
            raise GenerationError(f"prefix cache: expected block_size >= 1 and max_bytes >= 0, "
                                  f"found {block_size}, {max_bytes}")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.bytes_held = 0
        self.stats = PrefixStats()
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, tokens: list[int], version: str):
        """(key, parent key, block tokens) for each full block of `tokens`."""
        parent = None
        size = self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            block = tuple(tokens[start:start + size])
            key = hash((parent if parent is not None else ("root", version), block))
            yield key, parent, block
            parent = key

    def _lookup(self, key: int, parent: int | None, block: tuple, version: str) -> _Block | None:
        entry = self._blocks.get(key)
        if entry is None or entry.tokens != block or entry.parent != parent or entry.version != version:
            return None  # absent, or a hash collision: never serve it
        return entry

    def _cached_prefix(self, tokens: list[int], version: str) -> list[_Block]:
        """The cached blocks covering the longest block-aligned prefix of `tokens` (no refs, no stats)."""
        entries = []
        for key, parent, block in self._chain(tokens, version):
            entry = self._lookup(key, parent, block, version)
            if entry is None:
                break
            entries.append(entry)
        return entries

    def block_keys(self, tokens: list[int], version: str) -> list[int]:
        """Chain keys of the full blocks of `tokens` (cached or not)."""
        return [key for key, _, _ in self._chain(tokens, version)]

    def cached_tokens(self, tokens: list[int], version: str) -> int:
        """How many leading tokens of `tokens` are cached, in whole blocks (no reference taken, no stats)."""
        return len(self._cached_prefix(tokens, version)) * self.block_size

    def match(self, tokens: list[int], version: str) -> PrefixMatch:
        """Longest cached block-aligned prefix of `tokens`, leaving at least one token to compute.

        The matched blocks are referenced (protected from eviction) until `release`.
        """
        blocks = self._cached_prefix(tokens[:-1], version)
        for entry in blocks:  # root first: a parent is never more recent than its children
            entry.refs += 1
            self._blocks.move_to_end(entry.key)
        matched = len(blocks) * self.block_size
        if blocks:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
        self.stats.tokens_reused += matched
        self.stats.tokens_recomputed += len(tokens) - matched
        return PrefixMatch(matched, blocks)

    def release(self, match: PrefixMatch) -> None:
        for entry in match.blocks:
            entry.refs -= 1

    @staticmethod
    def gather(match: PrefixMatch) -> torch.Tensor:
        """The matched K/V as one tensor (L, 2, H, tokens, D)."""
        return torch.cat([entry.kv for entry in match.blocks], dim=3)

    def insert(self, tokens: list[int], version: str, kv_of) -> int:
        """Store the full blocks of `tokens` not cached yet. `kv_of(start, end)` returns the K/V of tokens
        [start, end) as (L, 2, H, end-start, D); it is called once, for the span of the missing blocks.
        Returns the number of new blocks."""
        added = 0
        held = []  # the chain walked so far is protected from eviction while deeper blocks are added
        span = None  # K/V of tokens [span_start, len(full blocks)), fetched once for all missing blocks
        size_tokens = len(tokens) - len(tokens) % self.block_size
        try:
            for index, (key, parent, block) in enumerate(self._chain(tokens, version)):
                entry = self._lookup(key, parent, block, version)
                if entry is None:
                    if key in self._blocks or (parent is not None and parent not in self._blocks):
                        break  # a hash collision with another chain: never overwrite it
                    start = index * self.block_size
                    if span is None:
                        span_start, span = start, kv_of(start, size_tokens)
                    offset = start - span_start
                    kv = span[:, :, :, offset:offset + self.block_size].clone()
                    size = kv.numel() * kv.element_size()
                    if not self._make_room(size):
                        self.stats.insert_skipped += 1
                        break
                    entry = self._blocks[key] = _Block(key, parent, block, kv, version)
                    if parent is not None:
                        self._blocks[parent].children.add(key)
                    self.bytes_held += size
                    added += 1
                self._blocks.move_to_end(entry.key)
                entry.refs += 1
                held.append(entry)
        finally:
            for entry in held:
                entry.refs -= 1
        self.stats.inserts += added
        return added

    def _make_room(self, size: int) -> bool:
        """Evict least recently used leaves (unpinned, unreferenced) until `size` more bytes fit."""
        victim = None
        while self.bytes_held + size > self.max_bytes:
            if victim is None:
                victim = next((b for b in self._blocks.values() if self._evictable(b)), None)
                if victim is None:
                    return False
            parent = self._blocks.get(victim.parent) if victim.parent is not None else None
            self._remove(victim)
            self.stats.evictions += 1
            # everything before the parent in LRU order was not evictable, so a parent that just became an
            # evictable leaf is the next least recently used one: no rescan needed
            victim = parent if parent is not None and self._evictable(parent) else None
        return True

    @staticmethod
    def _evictable(block: _Block) -> bool:
        return not block.children and block.refs == 0 and not block.pinned

    def _remove(self, entry: _Block) -> None:
        for child in list(entry.children):
            self._remove(self._blocks[child])
        del self._blocks[entry.key]
        if entry.parent is not None and entry.parent in self._blocks:
            self._blocks[entry.parent].children.discard(entry.key)
        self.bytes_held -= entry.kv.numel() * entry.kv.element_size()

    def pin(self, tokens: list[int], version: str, pinned: bool = True) -> int:
        """Pin (or unpin) the cached blocks of a prefix so eviction never takes them. Returns blocks touched."""
        entries = self._cached_prefix(tokens, version)
        for entry in entries:
            entry.pinned = pinned
        return len(entries)

    def invalidate(self, version: str | None = None, prefix: list[int] | None = None) -> int:
        """Drop entries: of one version, under one prefix (with `version`), or all when both are None.
        Blocks a running batch holds stay alive for it but can no longer be matched. Returns blocks dropped."""
        before = len(self._blocks)
        if prefix is not None:
            if version is None:
                raise GenerationError("invalidate(prefix=...): expected the version the prefix was cached under")
            entries = self._cached_prefix(prefix, version)
            if entries and len(entries) == len(prefix) // self.block_size:
                self._remove(entries[-1])  # with everything cached below it
        else:
            for entry in [b for b in self._blocks.values() if version is None or b.version == version]:
                if entry.key in self._blocks:
                    self._remove(entry)
        return before - len(self._blocks)
