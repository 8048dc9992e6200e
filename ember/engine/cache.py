"""The KV cache: the one owner of generation state (per-layer K/V, key validity, positions, write cursor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ember.errors import GenerationError

if TYPE_CHECKING:
    from ember.models.config import ModelConfig
    from ember.models.versions import LayerVersions


class KVCache:
    """Per-layer K/V for a batch of sequences, in a single allocation.

    Storage is one tensor of shape (L, 2, B, H_kv, S, D); each layer's K and V are views into it. Sequences
    in a batch share a write cursor (`length`, slots used): prompts are left-padded to a common length and
    padding slots are marked invalid in `key_valid` (B, S). Positions are explicit: `next_position` (B,) is
    the rotary position of each row's next token, so rows whose slots hold a selected subset of a context
    (gaps) keep the positions the K/V was computed at. `group` > 1 lets a forward pass over B/group rows (one
    per prompt) write the same K/V into `group` consecutive rows (its candidates): prefill once, shared by n.
    `versions` holds, per row, the per-layer versions of the weights that made its K/V.

    `layer_valid` (L, B, S), None until a `load` brings a per-layer validity, further hides keys from single
    layers (a past seen by some layers only): layer l attends to slot j of row b where both `key_valid[b, j]`
    and `layer_valid[l, b, j]` hold. Slots it was not loaded for are valid in every layer.
    """

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device):
        if batch < 1 or capacity < 1:
            raise GenerationError(f"cache size: expected batch >= 1 and capacity >= 1, found {batch}, {capacity}")
        self.config = config
        self.batch = batch
        self.capacity = capacity
        self.storage = self._allocate(dtype, device)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # (B, S)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # device-side cursor of fixed-shape steps
        self.length = 0
        self.has_padding = False  # True once any slot below the cursor is invalid (or hidden from some layer);
        # while False, attention skips masks
        self.layer_valid: torch.Tensor | None = None  # (L, B, S) per-layer key validity, None: every layer sees all
        self.versions: list[LayerVersions | None] = [None] * batch

    def _allocate(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The K/V storage: every row holds every slot, (L, 2, B, H, S, D)."""
        shape = (self.config.num_layers, 2, self.batch, self.config.num_kv_heads, self.capacity, self.config.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device)

    def reset(self) -> None:
        """Empty the cache for reuse (same buffers: captured CUDA graphs stay valid)."""
        self.key_valid.zero_()
        self.next_position.zero_()
        self.slot.zero_()
        self.length = 0
        self.has_padding = False
        self.layer_valid = None
        self.versions = [None] * self.batch

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (K, V) of one layer, each (B, H, S, D)."""
        return self.storage[index, 0], self.storage[index, 1]

    def _group(self, rows: int) -> int:
        return group_of(rows, self.batch)

    def write(self, index: int, slots: int | torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, H, T, D) at slots [start, start+T) and return this layer's K, V (b, H, start+T, D).

        With b < B each input row is broadcast into its group of B/b cache rows, and the returned views read
        the first row of each group (they hold identical values). `slots` as a device tensor (1,) is a
        fixed-shape decode step: k, v (B, H, 1, D) go to that slot; the views span the whole capacity.
        """
        if isinstance(slots, torch.Tensor):
            cache_k, cache_v = self._static_layer(index)
            cache_k.index_copy_(2, slots, k)
            cache_v.index_copy_(2, slots, v)
            return cache_k, cache_v
        start, end = slots, slots + k.shape[2]
        if end > self.capacity:
            raise GenerationError(f"cache overflow: writing up to {end} tokens into capacity {self.capacity}")
        return self._write_span(index, start, end, k, v)

    def _static_layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (K, V) views of a layer that the fixed-shape step's slot tensor indexes."""
        return self.layer(index)

    def _write_span(self, index: int, start: int, end: int, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`write` at slots [start, end) (within capacity)."""
        cache_k, cache_v = self.layer(index)
        return write_rows(cache_k, cache_v, start, end, k, v)

    def attention_at(self, slot: int | None):
        """The attention a step writing at `slot` (None: the fixed-shape decode step) runs instead of attention
        over the keys `write` returns: None here (plain attention); a cache that keeps some K/V elsewhere
        returns its own (`Step.attend`)."""
        return None

    def static_slot(self) -> torch.Tensor:
        """The write slot of the fixed-shape decode step, as `write` takes it: the device-side cursor (1,)."""
        return self.slot

    def key_mask(self, rows: int, end: int) -> torch.Tensor:
        """Validity of keys [0, end) for a forward over `rows` rows (one per group): (rows, end)."""
        return self.key_valid[::self._group(rows), :end]

    def layer_key_mask(self, rows: int, end: int) -> torch.Tensor:
        """Per-layer validity of keys [0, end) for a forward over `rows` rows (one per group): (L, rows, end).
        Only when `layer_valid` exists."""
        return self.layer_valid[:, ::self._group(rows), :end]

    def reserve(self, rows: int, steps: int, valid: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """Claim the next `steps` slots for new tokens of `rows` rows (rows dividing B).

        `valid` (rows, steps) marks real tokens; None means all are real (no device sync is needed then).
        Positions continue each row's `next_position` (padding takes the position of the next real token),
        unless explicit `positions` (rows, steps) are given. Marks the slots' key validity, advances the cursor
        and each row's next position to one past its largest real position (never backwards), and returns the
        first slot and the rotary positions (b, T).
        """
        group = self._group(rows)
        start = self.length
        if start + steps > self.capacity:
            raise GenerationError(f"cache overflow: {start} + {steps} tokens exceed capacity {self.capacity}")
        if positions is None:
            offsets = (torch.arange(steps, device=self.next_position.device)[None] if valid is None
                       else (valid.long().cumsum(-1) - 1).clamp(min=0))  # (b or 1, T)
            positions = self.next_position[::group, None] + offsets  # (b, T)
        if valid is None:
            self.key_valid[:, start:start + steps] = True
            last = positions.amax(-1)  # (b,)
        else:
            self.key_valid[:, start:start + steps] = valid.repeat_interleave(group, dim=0)
            last = torch.where(valid, positions, -1).amax(-1)  # (b,) last real position, -1 if none
            self.has_padding = self.has_padding or not bool(valid.all())
        self.next_position.copy_(torch.maximum(self.next_position, (last + 1).repeat_interleave(group)))
        self.length = start + steps
        return start, positions

    def reserve_static(self) -> torch.Tensor:
        """Claim one slot per row for a decode step whose shapes never change (safe to capture in a CUDA graph).

        Device-side only: marks the slot held in `slot` valid and advances each row's next position. After
        the forward, `slot` moves on with `advance_static`, and the host cursor with `length += 1`.
        Returns rotary positions (B, 1).
        """
        positions = self.next_position[:, None].clone()  # (B, 1)
        self.key_valid.index_fill_(1, self.slot, True)
        self.next_position += 1
        return positions

    @property
    def layout(self) -> tuple[int, int, int, int]:
        """(batch, capacity, rows per stored prompt, prompt slots stored once): what a CUDA graph is captured for."""
        return self.batch, self.capacity, 1, 0

    def start_decode(self) -> None:
        """Ready the cursor for decode steps after the prefill (a dense cache decodes right after the prompt)."""

    def advance_static(self) -> None:
        """Move the device-side slot on by one (the host cursor is the caller's)."""
        self.slot += 1

    def sync_slot(self) -> None:
        """Point the device-side slot at the host cursor, checking there is room for fixed-shape steps."""
        if self.length >= self.capacity:
            raise GenerationError(f"cache overflow: no slot left after {self.length} of {self.capacity}")
        self.slot.fill_(self.length)

    def load(self, rows: slice, start: int, kv: torch.Tensor, next_position: int,
             layer_valid: torch.Tensor | None = None) -> None:
        """Copy K/V (L, 2, H, m, D) into `rows` at slots [start, start+m); the slots become valid keys and the
        rows' next position is `next_position` (the K/V keeps the positions it was computed at).

        `layer_valid` (L, m) bool hides loaded slots from single layers: the cache's `layer_valid` is then
        allocated (all True) if it was None, and the steps built on it carry explicit per-layer masks."""
        tokens = kv.shape[3]
        if start + tokens > self.capacity:
            raise GenerationError(f"cache overflow: loading {tokens} tokens at slot {start} into capacity "
                                  f"{self.capacity}")
        expected = (self.config.num_layers, tokens)
        if layer_valid is not None and (layer_valid.dtype != torch.bool or tuple(layer_valid.shape) != expected):
            raise GenerationError(f"layer_valid: expected a bool tensor of shape (L, m) = {expected}, found "
                                  f"{layer_valid.dtype} of shape {tuple(layer_valid.shape)}")
        self._store(rows, start, kv)
        self.key_valid[rows, start:start + tokens] = True
        self.next_position[rows] = next_position
        if layer_valid is not None and self.layer_valid is None:
            self.layer_valid = torch.ones(self.config.num_layers, self.batch, self.capacity, dtype=torch.bool,
                                          device=self.key_valid.device)  # (L, B, S)
            self.has_padding = True  # explicit boolean masks from now on
        if self.layer_valid is not None:
            seen = True if layer_valid is None else layer_valid[:, None].to(self.key_valid.device)  # (L, 1, m)
            self.layer_valid[:, rows, start:start + tokens] = seen

    def skip_to(self, slot: int) -> None:
        """Move the cursor to `slot` after K/V was loaded below it (unfilled slots stay invalid keys)."""
        if slot > self.capacity:
            raise GenerationError(f"cache overflow: cursor {slot} beyond capacity {self.capacity}")
        self.length = slot
        self.has_padding = self.has_padding or not bool(self.key_valid[:, :slot].all())

    def _store(self, rows: slice, start: int, kv: torch.Tensor) -> None:
        """`load`'s copy of K/V (L, 2, H, m, D) into `rows` at slots [start, start+m)."""
        self.storage[:, :, rows, :, start:start + kv.shape[3]] = kv[:, :, None].to(self.storage)

    def read(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """K/V of one row at the given slots: (L, 2, H, len(slots), D)."""
        return self.storage[:, :, row].index_select(3, slots.to(self.storage.device))


def group_of(rows: int, batch: int) -> int:
    """Cache rows per forward row when a forward over `rows` rows writes a cache of `batch` rows."""
    if rows < 1 or batch % rows:
        raise GenerationError(f"forward batch {rows} does not divide cache batch {batch}")
    return batch // rows


def write_rows(cache_k: torch.Tensor, cache_v: torch.Tensor, start: int, end: int, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store k, v (b, H, T, D) into the cache rows cache_k, cache_v (B', H, S, D) at slots [start, end), each
    input row into its group of B'/b consecutive rows; returns the K, V (b, H, end, D) read from the first
    row of each group."""
    rows = k.shape[0]
    group = group_of(rows, cache_k.shape[0])
    if group == 1:
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        return cache_k[:, :, :end], cache_v[:, :, :end]
    shape = (rows, group) + cache_k.shape[1:]  # (b, g, H, S, D)
    cache_k.view(shape)[:, :, :, start:end] = k.unsqueeze(1)
    cache_v.view(shape)[:, :, :, start:end] = v.unsqueeze(1)
    return cache_k.view(shape)[:, 0, :, :end], cache_v.view(shape)[:, 0, :, :end]
