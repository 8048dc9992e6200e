"""The KV cache: the one owner of generation state (per-layer K/V, key validity, write cursor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ember.errors import GenerationError

if TYPE_CHECKING:
    from ember.models.config import ModelConfig


class KVCache:
    """Per-layer K/V for a batch of sequences, in a single allocation.

    Storage is one tensor of shape (L, 2, B, H_kv, S, D); each layer's K and V are views into it. Sequences
    in a batch share a write cursor (`length`, slots used): prompts are left-padded to a common length and
    padding slots are marked invalid in `key_valid` (B, S). `lengths` (B,) counts each row's real tokens, so
    the rotary position of a row's next token is its length. `group` > 1 lets a forward pass over B/group
    rows (one per prompt) write the same K/V into `group` consecutive rows (its candidates): prefill once,
    shared by n.
    """

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device):
        if batch < 1 or capacity < 1:
            raise GenerationError(f"cache size: expected batch >= 1 and capacity >= 1, found {batch}, {capacity}")
        self.config = config
        self.batch = batch
        self.capacity = capacity
        shape = (config.num_layers, 2, batch, config.num_kv_heads, capacity, config.head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)  # (L, 2, B, H, S, D)
        self.key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # (B, S)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
        self.length = 0
        self.has_padding = False  # True once any slot is marked invalid; lets attention skip masks
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # device-side cursor of static decode steps

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (K, V) of one layer, each (B, H, S, D)."""
        return self.storage[index, 0], self.storage[index, 1]

    def _group(self, rows: int) -> int:
        if rows < 1 or self.batch % rows:
            raise GenerationError(f"forward batch {rows} does not divide cache batch {self.batch}")
        return self.batch // rows

    def write(self, index: int, start: int | None, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, H, T, D) at [start, start+T) and return this layer's K, V (b, H, start+T, D).

        With b < B each input row is broadcast into its group of B/b cache rows, and the returned views read
        the first row of each group (they hold identical values). `start` None is a static decode step
        (see `reserve_static`): k, v (B, H, 1, D) go to the slot held on the device; views span the capacity.
        """
        if start is None:  # static step: one token per row at the device-side slot, full-capacity views
            cache_k, cache_v = self.layer(index)
            cache_k.index_copy_(2, self.slot, k)
            cache_v.index_copy_(2, self.slot, v)
            return cache_k, cache_v
        rows, _, steps, _ = k.shape
        end = start + steps
        if end > self.capacity:
            raise GenerationError(f"cache overflow: writing up to {end} tokens into capacity {self.capacity}")
        group = self._group(rows)
        cache_k, cache_v = self.layer(index)
        if group == 1:
            cache_k[:, :, start:end] = k
            cache_v[:, :, start:end] = v
            return cache_k[:, :, :end], cache_v[:, :, :end]
        shape = (rows, group) + cache_k.shape[1:]  # (b, g, H, S, D)
        cache_k.view(shape)[:, :, :, start:end] = k.unsqueeze(1)
        cache_v.view(shape)[:, :, :, start:end] = v.unsqueeze(1)
        return cache_k.view(shape)[:, 0, :, :end], cache_v.view(shape)[:, 0, :, :end]

    def key_mask(self, rows: int, end: int) -> torch.Tensor:
        """Validity of keys [0, end) for a forward over `rows` rows (one per group): (rows, end)."""
        group = self._group(rows)
        return self.key_valid[::group, :end]

    def reserve(self, rows: int, steps: int, valid: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """Claim the next `steps` slots for new tokens of `rows` rows (rows dividing B).

        `valid` (rows, steps) marks real tokens; None means all are real (no device sync is needed then).
        Marks the slots' key validity, advances the cursor and row lengths, and returns the first slot and the
        rotary positions (b, T) of the new tokens (padding tokens get the position of the next real one).
        """
        group = self._group(rows)
        start = self.length
        if start + steps > self.capacity:
            raise GenerationError(f"cache overflow: {start} + {steps} tokens exceed capacity {self.capacity}")
        row_lengths = self.lengths[::group]  # (b,)
        if valid is None:
            positions = row_lengths[:, None] + torch.arange(steps, device=row_lengths.device)  # (b, T)
            self.key_valid[:, start:start + steps] = True
            self.lengths += steps
        else:
            positions = row_lengths[:, None] + (valid.long().cumsum(-1) - 1).clamp(min=0)  # (b, T)
            self.key_valid[:, start:start + steps] = valid.repeat_interleave(group, dim=0)
            self.lengths += valid.sum(-1).repeat_interleave(group)
            self.has_padding = self.has_padding or not bool(valid.all())
        self.length = start + steps
        return start, positions

    def reserve_static(self) -> torch.Tensor:
        """Claim one slot per row for a decode step whose shapes never change (safe to capture in a CUDA graph).

        The slot index lives on the device in `slot` (call `sync_slot` once before a run of static steps);
        `advance_static` moves it on after the step. Returns rotary positions (B, 1).
        """
        positions = self.lengths[:, None].clone()  # (B, 1)
        self.key_valid.index_fill_(1, self.slot, True)
        self.lengths += 1
        return positions

    def advance_static(self) -> None:
        """Finish a static step: the device slot and the host cursor move on by one."""
        self.slot += 1
        self.length += 1

    def sync_slot(self) -> None:
        """Point the device-side slot at the host cursor, checking there is room for static steps."""
        if self.length >= self.capacity:
            raise GenerationError(f"cache overflow: no slot left after {self.length} of {self.capacity}")
        self.slot.fill_(self.length)

    def load_prefix(self, prompt: int, group: int, start: int, kv: torch.Tensor) -> None:
        """Copy reused K/V (L, 2, H, m, D) of one prompt into its `group` rows at slots [start, start+m).

        The slots become valid keys and the rows' lengths become m (the positions the K/V was computed at).
        """
        tokens = kv.shape[3]
        rows = slice(prompt * group, (prompt + 1) * group)
        self.storage[:, :, rows, :, start:start + tokens] = kv[:, :, None].to(self.storage.dtype)
        self.key_valid[rows, start:start + tokens] = True
        self.lengths[rows] = tokens

    def skip_to(self, slot: int) -> None:
        """Move the cursor to `slot` after prefixes were loaded below it (unfilled slots stay invalid keys)."""
        if slot > self.capacity:
            raise GenerationError(f"cache overflow: cursor {slot} beyond capacity {self.capacity}")
        self.length = slot
        self.has_padding = self.has_padding or not bool(self.key_valid[:, :slot].all())

    def read(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """K/V of one row at the given slots: (L, 2, H, len(slots), D)."""
        return self.storage[:, :, row].index_select(3, slots.to(self.storage.device))
