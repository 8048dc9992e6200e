"""Prefix KV cache: block-granular reuse of prompt prefixes across prompts, candidates and calls.

Blocks of `block_size` tokens are keyed by a chained hash (parent block key, block tokens) rooted at the base
model's fingerprint, so engines over different models sharing one cache never see each other's K/V. Each block
holds its K/V for all layers, (L, 2, H_kv, block, D), the per-layer versions of the weights that made it, and
optionally the input hidden states of chosen boundary layers (so layers above a boundary can be recomputed).
A match reports the reusable depth: the first layer whose version differs from the weights in use. A block
recomputed under new weights replaces the stale one in place. Entries have reference counts (blocks in use by a
running batch are never evicted), can be pinned, and are evicted least-recently-used, leaves first, under a
byte budget that counts K/V and boundary states.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ember.errors import GenerationError
from ember.models.versions import LayerVersions


@dataclass
class PrefixStats:
    """Counters since the cache was created."""

    hits: int = 0  # requests that reused at least one block
    misses: int = 0  # requests that reused nothing
    tokens_reused: int = 0
    tokens_recomputed: int = 0
    evictions: int = 0
    inserts: int = 0
    insert_skipped: int = 0  # blocks not stored: nothing could be evicted, or a stale block was held by a match
    replaced: int = 0  # stale blocks overwritten with K/V of the weights in use

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Block:
    key: int
    parent: int | None
    tokens: tuple[int, ...]
    model: str  # fingerprint of the base model
    kv: torch.Tensor  # (L, 2, H, block, D)
    versions: tuple[str, ...]  # per layer
    hidden: torch.Tensor | None = None  # (len(boundary_layers), block, hidden) input states of boundary layers
    refs: int = 0
    pinned: bool = False
    children: set = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        held = self.kv.numel() * self.kv.element_size()
        return held + (0 if self.hidden is None else self.hidden.numel() * self.hidden.element_size())


@dataclass
class PrefixMatch:
    """Cached blocks covering the first `tokens` tokens of a prompt, valid to layer `depth` (exclusive) under
    the weights asked for; hold it until the K/V is copied out."""

    tokens: int
    blocks: list
    depth: int = 0


class PrefixCache:
    """Block-granular prefix cache with LRU eviction under `max_bytes`.

    `boundary_layers`: layers whose input hidden states each block also stores (e.g. (N,) so that layers
    >= N can be recomputed from them after an update that leaves layers < N valid).
    """

    def __init__(self, block_size: int = 16, max_bytes: int = 1 << 30, boundary_layers: tuple[int, ...] = ()):
        if block_size < 1 or max_bytes < 0:
            raise GenerationError(f"prefix cache: expected block_size >= 1 and max_bytes >= 0, "
                                  f"found {block_size}, {max_bytes}")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.boundary_layers = tuple(sorted(set(boundary_layers)))
        self.bytes_held = 0
        self.stats = PrefixStats()
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._blocks)

    def state(self) -> dict:
        """Everything the cache holds, for a checkpoint: settings, counters and the blocks, parents before
        children (each with its parent's index and its rank in LRU order; hash keys are not stored, they differ
        between processes)."""
        ordered, stack = [], [b for b in self._blocks.values() if b.parent is None]
        while stack:
            block = stack.pop()
            ordered.append(block)
            stack.extend(self._blocks[key] for key in sorted(block.children))
        index = {b.key: i for i, b in enumerate(ordered)}
        lru = {key: rank for rank, key in enumerate(self._blocks)}
        blocks = [{"parent": None if b.parent is None else index[b.parent], "tokens": list(b.tokens),
                   "model": b.model, "kv": b.kv, "versions": list(b.versions), "hidden": b.hidden,
                   "pinned": b.pinned, "lru": lru[b.key]} for b in ordered]
        return {"block_size": self.block_size, "max_bytes": self.max_bytes,
                "boundary_layers": list(self.boundary_layers), "stats": self.stats.as_dict(), "blocks": blocks}

    @classmethod
    def from_state(cls, state: dict, device=None) -> "PrefixCache":
        """The cache a `state()` describes (tensors moved to `device`), with the blocks' keys rebuilt here."""
        cache = cls(state["block_size"], state["max_bytes"], tuple(state["boundary_layers"]))
        cache.stats = PrefixStats(**state["stats"])
        entries = []
        for saved in state["blocks"]:
            if saved["parent"] is not None and not 0 <= saved["parent"] < len(entries):
                raise GenerationError(f"prefix cache state: expected every parent block before its children, "
                                      f"found parent index {saved['parent']} at block {len(entries)}")
            parent = None if saved["parent"] is None else entries[saved["parent"]].key
            tokens = tuple(saved["tokens"])
            hidden = None if saved["hidden"] is None else saved["hidden"].to(device)
            entry = _Block(cls._key(parent, saved["model"], tokens), parent, tokens, saved["model"],
                           saved["kv"].to(device), tuple(saved["versions"]), hidden, pinned=saved["pinned"])
            if parent is not None:
                entries[saved["parent"]].children.add(entry.key)
            cache.bytes_held += entry.nbytes
            entries.append(entry)
        for _, entry in sorted(zip(state["blocks"], entries), key=lambda pair: pair[0]["lru"]):
            cache._blocks[entry.key] = entry
        return cache

    @staticmethod
    def _key(parent: int | None, model: str, block: tuple) -> int:
        """A block's key: the hash of its parent's key (or the model's root) and its tokens."""
        return hash((parent if parent is not None else ("root", model), block))

    def _chain(self, tokens: list[int], model: str):
        """(key, parent key, block tokens) for each full block of `tokens`."""
        parent = None
        size = self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            block = tuple(tokens[start:start + size])
            key = self._key(parent, model, block)
            yield key, parent, block
            parent = key

    def _lookup(self, key: int, parent: int | None, block: tuple, model: str) -> _Block | None:
        entry = self._blocks.get(key)
        if entry is None or entry.tokens != block or entry.parent != parent or entry.model != model:
            return None  # absent, or a hash collision: never serve it
        return entry

    def _cached_prefix(self, tokens: list[int], versions: LayerVersions, min_depth: int | None) -> list[_Block]:
        """The cached blocks covering the longest block-aligned prefix of `tokens` whose K/V is valid to at
        least `min_depth` layers (None: all layers) under `versions` (no refs, no stats)."""
        need = len(versions.layers) if min_depth is None else min_depth
        entries = []
        for key, parent, block in self._chain(tokens, versions.model):
            entry = self._lookup(key, parent, block, versions.model)
            if entry is None or (entry.versions != versions.layers and versions.reusable_depth(entry.versions) < need):
                break
            entries.append(entry)
        return entries

    def block_keys(self, tokens: list[int], versions: LayerVersions) -> list[int]:
        """Chain keys of the full blocks of `tokens` (cached or not)."""
        return [key for key, _, _ in self._chain(tokens, versions.model)]

    def cached_tokens(self, tokens: list[int], versions: LayerVersions, min_depth: int | None = None) -> int:
        """How many leading tokens of `tokens` are cached, in whole blocks, valid to `min_depth` layers (None:
        all) under `versions` (no reference taken, no stats)."""
        return len(self._cached_prefix(tokens, versions, min_depth)) * self.block_size

    def match(self, tokens: list[int], versions: LayerVersions, min_depth: int | None = None) -> PrefixMatch:
        """Longest cached block-aligned prefix of `tokens` valid to at least `min_depth` layers (None: all
        layers) under `versions`, leaving at least one token to compute. `depth` of the result is the number of
        leading layers valid in every matched block.

        The matched blocks are referenced (protected from eviction) until `release`.
        """
        blocks = self._cached_prefix(tokens[:-1], versions, min_depth)
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
        stale = [b for b in blocks if b.versions != versions.layers]  # tuple equality first: the common case
        depth = min((versions.reusable_depth(b.versions) for b in stale), default=len(versions.layers))
        return PrefixMatch(matched, blocks, depth)

    def release(self, match: PrefixMatch) -> None:
        for entry in match.blocks:
            entry.refs -= 1

    @staticmethod
    def gather(match: PrefixMatch) -> torch.Tensor:
        """The matched K/V as one tensor (L, 2, H, tokens, D)."""
        return torch.cat([entry.kv for entry in match.blocks], dim=3)

    @staticmethod
    def gather_hidden(match: PrefixMatch) -> torch.Tensor:
        """The matched boundary hidden states (len(boundary_layers), tokens, hidden)."""
        if any(entry.hidden is None for entry in match.blocks):
            raise GenerationError("prefix cache: expected boundary hidden states in every matched block, found "
                                  "blocks without (create the cache with boundary_layers)")
        return torch.cat([entry.hidden for entry in match.blocks], dim=1)

    def insert(self, tokens: list[int], versions: LayerVersions, kv_of, hidden_of=None) -> int:
        """Store the full blocks of `tokens` not cached yet under `versions`, replacing stale ones in place.

        `kv_of(start, end)` returns the K/V of tokens [start, end) as (L, 2, H, end-start, D) and `hidden_of`
        (required with boundary layers) their boundary hidden states (len(boundary_layers), end-start, hidden);
        each is called once, for the span from the first block to store. Returns the number of blocks stored.
        """
        if self.boundary_layers and hidden_of is None:
            raise GenerationError(f"prefix cache insert: expected boundary hidden states for layers "
                                  f"{self.boundary_layers}, found none")
        added = replaced = 0
        held = []  # the chain walked so far is protected from eviction while deeper blocks are added
        span = None  # K/V (and hidden states) of tokens [span_start, full blocks), fetched once
        size_tokens = len(tokens) - len(tokens) % self.block_size
        try:
            for index, (key, parent, block) in enumerate(self._chain(tokens, versions.model)):
                entry = self._lookup(key, parent, block, versions.model)
                if entry is None and (key in self._blocks or (parent is not None and parent not in self._blocks)):
                    break  # a hash collision with another chain: never overwrite it
                if entry is not None and entry.versions != versions.layers and entry.refs > 0:
                    self.stats.insert_skipped += 1  # stale but held by a match: left as it is for its holder
                elif entry is None or entry.versions != versions.layers:
                    start = index * self.block_size
                    if span is None:
                        span_start = start
                        span = (kv_of(start, size_tokens),
                                hidden_of(start, size_tokens) if self.boundary_layers else None)
                    offset = start - span_start
                    kv = span[0][:, :, :, offset:offset + self.block_size].clone()
                    hidden = None if span[1] is None else span[1][:, offset:offset + self.block_size].clone()
                    if entry is not None:  # stale: same tokens, other weights
                        self.bytes_held -= entry.nbytes
                        entry.kv, entry.hidden, entry.versions = kv, hidden, versions.layers
                        self.bytes_held += entry.nbytes
                        replaced += 1
                    else:
                        entry = _Block(key, parent, block, versions.model, kv, versions.layers, hidden)
                        if not self._make_room(entry.nbytes):
                            self.stats.insert_skipped += 1
                            break
                        self._blocks[key] = entry
                        if parent is not None:
                            self._blocks[parent].children.add(key)
                        self.bytes_held += entry.nbytes
                        added += 1
                self._blocks.move_to_end(entry.key)
                entry.refs += 1
                held.append(entry)
        finally:
            for entry in held:
                entry.refs -= 1
        self.stats.inserts += added
        self.stats.replaced += replaced
        return added + replaced

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
        self.bytes_held -= entry.nbytes

    def pin(self, tokens: list[int], versions: LayerVersions, pinned: bool = True) -> int:
        """Pin (or unpin) the cached blocks of a prefix (whatever their layer versions) so eviction never takes
        them. Returns blocks touched."""
        entries = self._cached_prefix(tokens, versions, min_depth=0)
        for entry in entries:
            entry.pinned = pinned
        return len(entries)

    def paths(self, model: str) -> list[list[_Block]]:
        """Every root-to-leaf chain of `model`'s cached blocks (a block at chain index d holds the K/V of
        positions [d * block_size, (d + 1) * block_size)); chains sharing a prefix share its blocks."""
        chains, stack = [], [[b] for b in self._blocks.values() if b.parent is None and b.model == model]
        while stack:
            chain = stack.pop()
            children = sorted(chain[-1].children)
            if not children:
                chains.append(chain)
            stack.extend(chain + [self._blocks[key]] for key in children)
        return chains

    def blocks(self, model: str) -> list[_Block]:
        """`model`'s cached blocks, parents before children."""
        seen, ordered = set(), []
        for chain in self.paths(model):
            for block in chain:
                if block.key not in seen:
                    seen.add(block.key)
                    ordered.append(block)
        return ordered

    def accept(self, versions: LayerVersions) -> int:
        """Label every block of `versions.model` as made under `versions` (a policy reusing stale K/V, or K/V it
        has recomputed or corrected), so generation reuses them. Returns the number of blocks relabelled."""
        changed = 0
        for block in self._blocks.values():
            if block.model == versions.model and block.versions != versions.layers:
                if block.refs:
                    raise GenerationError("prefix cache accept: a block is held by a running match; apply "
                                          "policies between generation calls")
                block.versions = versions.layers
                changed += 1
        return changed

    def invalidate(self, versions: LayerVersions | None = None, prefix: list[int] | None = None) -> int:
        """Drop entries: all (no arguments); those of `versions.model` not fully valid under `versions`; or,
        with `prefix`, the chain under that prefix of `versions.model`. Blocks a running batch holds stay alive
        for it but can no longer be matched. Returns blocks dropped."""
        before = len(self._blocks)
        if prefix is not None:
            if versions is None:
                raise GenerationError("invalidate(prefix=...): expected the versions the prefix was cached under")
            entries = self._cached_prefix(prefix, versions, min_depth=0)
            if entries and len(entries) == len(prefix) // self.block_size:
                self._remove(entries[-1])  # with everything cached below it
        else:
            stale = [b for b in self._blocks.values()
                     if versions is None or (b.model == versions.model and b.versions != versions.layers)]
            for entry in stale:
                if entry.key in self._blocks:
                    self._remove(entry)
        return before - len(self._blocks)
