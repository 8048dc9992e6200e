"""A KV cache that stores each prompt's K/V once, for all of its candidates.

A rollout decodes n candidates of each prompt; a dense `KVCache` gives every candidate row its own copy of the
prompt's K/V (n copies). Here the slots split in two regions:

    slots [0, S_p)        the prompt region  (L, 2, P, H, S_p, D): one row per prompt, written by the prefill
    slots [S_p, S_p+S_g)  the generated region (L, 2, B, H, S_g, D): one row per candidate (B = P * group)

Validity, positions and the write cursor are the dense cache's (`KVCache`, over the joint slot range), so the
prefill and the step builder work unchanged. A decode step (one new token per candidate, at a slot past S_p)
attends through `attend`: one softmax over the prompt region, read once per prompt with all of its candidates'
queries together, and the candidate's own generated keys.
"""

from __future__ import annotations

import torch

from ember.engine.cache import KVCache
from ember.errors import GenerationError


class SharedPromptCache(KVCache):
    """K/V of `batch` rows, `group` consecutive rows per prompt, whose first `prompt_slots` slots are stored
    once per prompt (`prompt`, (L, 2, P, H, S_p, D)) and the rest per row (`storage`, (L, 2, B, H, S_g, D)).

    Writes go to the prompt region from forward passes over one row per prompt within slots [0, S_p) (the
    prefill), and to the generated region from passes over every row past S_p (decode steps). Per-layer key
    validity (a past seen by some layers only) is not supported: such a batch uses a dense `KVCache`."""

    def __init__(self, config, batch: int, group: int, prompt_slots: int, capacity: int, dtype: torch.dtype,
                 device):
        if group < 1 or batch % group:
            raise GenerationError(f"shared prompt cache: expected a group dividing the batch {batch}, found {group}")
        if not 0 < prompt_slots < capacity:
            raise GenerationError(f"shared prompt cache: expected 0 < prompt slots < capacity {capacity}, found "
                                  f"{prompt_slots}")
        self.group = group
        self.prompts = batch // group
        self.prompt_slots = prompt_slots
        super().__init__(config, batch, capacity, dtype, device)
        self.slot.fill_(prompt_slots)

    def _allocate(self, dtype: torch.dtype, device) -> torch.Tensor:
        c = self.config
        self.prompt = torch.zeros(c.num_layers, 2, self.prompts, c.num_kv_heads, self.prompt_slots, c.head_dim,
                                  dtype=dtype, device=device)  # (L, 2, P, H, S_p, D)
        return torch.zeros(c.num_layers, 2, self.batch, c.num_kv_heads, self.capacity - self.prompt_slots,
                           c.head_dim, dtype=dtype, device=device)  # (L, 2, B, H, S_g, D)

    @property
    def nbytes(self) -> int:
        return (self.prompt.numel() + self.storage.numel()) * self.storage.element_size()

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise GenerationError("shared prompt cache: a layer's K/V lives in two regions; read rows with `read`")

    @property
    def layout(self) -> tuple[int, int, int, int]:
        return self.batch, self.capacity, self.group, self.prompt_slots

    def start_decode(self) -> None:
        """Move the cursor past the prompt region: a prompt shorter than the region (a workspace sized up to
        its bucket) leaves its last slots unwritten, invalid keys, and decode writes in the generated region."""
        if self.length < self.prompt_slots:
            self.skip_to(self.prompt_slots)

    def reset(self) -> None:
        super().reset()
        self.slot.fill_(self.prompt_slots)  # a fixed-shape step always writes in the generated region

    def sync_slot(self) -> None:
        if self.length < self.prompt_slots:
            raise GenerationError(f"shared prompt cache: decode starts at slot {self.prompt_slots} or later, found "
                                  f"the cursor at {self.length}")
        super().sync_slot()

    def static_slot(self) -> torch.Tensor:
        return self.slot - self.prompt_slots  # (1,) slot in the generated region

    def attention_at(self, slot: int | None):
        return self.attend if slot is None or slot >= self.prompt_slots else None

    def _static_layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.storage[index, 0], self.storage[index, 1]  # (B, H, S_g, D), indexed by `static_slot`

    def _write_span(self, index: int, start: int, end: int, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill (b = P rows, slots below S_p) goes to the prompt region and returns its K, V (P, H, end, D);
        a decode step (b = B rows, slots from S_p) goes to the generated region and returns the rows' generated
        K, V (B, H, end - S_p, D)."""
        rows = k.shape[0]
        if rows == self.prompts and end <= self.prompt_slots:
            prompt_k, prompt_v = self.prompt[index, 0], self.prompt[index, 1]  # (P, H, S_p, D)
            prompt_k[:, :, start:end] = k
            prompt_v[:, :, start:end] = v
            return prompt_k[:, :, :end], prompt_v[:, :, :end]
        if rows == self.batch and start >= self.prompt_slots:
            first, last = start - self.prompt_slots, end - self.prompt_slots
            generated_k, generated_v = self.storage[index, 0], self.storage[index, 1]  # (B, H, S_g, D)
            generated_k[:, :, first:last] = k
            generated_v[:, :, first:last] = v
            return generated_k[:, :, :last], generated_v[:, :, :last]
        raise GenerationError(f"shared prompt cache: expected a write of {self.prompts} rows below slot "
                              f"{self.prompt_slots} or of {self.batch} rows from it, found {rows} rows at "
                              f"slots [{start}, {end})")

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention of one new token per row, q (B, H, 1, D), over its prompt's K/V and its own generated K/V
        `keys`, `values` (B, H_kv, S, D) (generated slots [S_p, S_p + S)), in one softmax computed in fp32.
        The matmuls read K/V in the cache's dtype (no fp32 copy of a layer's K/V per step), so at bf16 the
        scores and weights are rounded to bf16 (fused attention kernels keep the scores in fp32: this is
        less exact, within the tests' bf16 tolerance). Returns (B, H, 1, D) in the cache's dtype."""
        rows, heads, steps, dim = q.shape
        if steps != 1 or rows != self.batch:
            raise GenerationError(f"shared prompt cache: attention expects one query per row ({self.batch} rows), "
                                  f"found {rows} rows of {steps}")
        kv_heads, group, prompts = self.config.num_kv_heads, self.group, self.prompts
        rep, generated = heads // kv_heads, keys.shape[2]
        scale = dim ** -0.5
        dtype = values.dtype
        q = (q * scale).to(dtype).view(prompts, group, kv_heads, rep, dim)  # (P, g, Hkv, r, D), scaled first
        prompt_k, prompt_v = self.prompt[layer, 0], self.prompt[layer, 1]  # (P, Hkv, S_p, D)
        # the prompt region: a prompt's candidates' queries together against its one copy of K
        q_by_prompt = q.permute(0, 2, 1, 3, 4).reshape(prompts, kv_heads, group * rep, dim)  # (P, Hkv, g*r, D)
        prompt_scores = (q_by_prompt @ prompt_k.mT).float()  # (P, Hkv, g*r, S_p)
        prompt_valid = self.key_valid[::group, None, None, :self.prompt_slots]  # (P, 1, 1, S_p)
        prompt_scores = prompt_scores.masked_fill(~prompt_valid, float("-inf"))
        # the generated region: each row against its own keys
        own_scores = (q.view(rows, kv_heads, rep, dim) @ keys.to(dtype).mT).float()  # (B, Hkv, r, S)
        own_valid = self.key_valid[:, None, None, self.prompt_slots:self.prompt_slots + generated]  # (B, 1, 1, S)
        own_scores = own_scores.masked_fill(~own_valid, float("-inf"))
        # one softmax over both: a shared maximum and normalizer per (row, head)
        prompt_scores = prompt_scores.view(prompts, kv_heads, group, rep, self.prompt_slots)  # (P, Hkv, g, r, S_p)
        own_scores = own_scores.view(prompts, group, kv_heads, rep, generated).transpose(1, 2)  # (P, Hkv, g, r, S)
        top = torch.maximum(prompt_scores.amax(-1, keepdim=True), own_scores.amax(-1, keepdim=True))
        prompt_weights, own_weights = (prompt_scores - top).exp(), (own_scores - top).exp()
        total = prompt_weights.sum(-1, keepdim=True) + own_weights.sum(-1, keepdim=True)  # (P, Hkv, g, r, 1)
        prompt_weights = prompt_weights.to(dtype).reshape(prompts, kv_heads, group * rep, self.prompt_slots)
        out = (prompt_weights @ prompt_v).float().view(prompts, kv_heads, group, rep, dim)  # (P, Hkv, g, r, D)
        own_weights = own_weights.transpose(1, 2).reshape(rows, kv_heads, rep, generated).to(dtype)  # (B, Hkv, r, S)
        own_out = (own_weights @ values).float().view(prompts, group, kv_heads, rep, dim)  # (P, g, Hkv, r, D)
        out = out + own_out.transpose(1, 2)
        out = (out / total).transpose(1, 2).reshape(rows, heads, 1, dim)  # (B, H, 1, D)
        return out.to(dtype)

    def load(self, rows: slice, start: int, kv: torch.Tensor, next_position: int,
             layer_valid: torch.Tensor | None = None) -> None:
        """Copy K/V (L, 2, H, m, D) once into the prompt region of the prompt whose rows are `rows` (one whole
        group), at slots [start, start+m) below S_p."""
        if layer_valid is not None:
            raise GenerationError("shared prompt cache: per-layer key validity is not supported; use a KVCache")
        first, stop, _ = rows.indices(self.batch)
        tokens = kv.shape[3]
        if first % self.group or stop - first != self.group:
            raise GenerationError(f"shared prompt cache: expected the rows of one prompt ({self.group} rows from a "
                                  f"multiple of {self.group}), found rows [{first}, {stop})")
        if start + tokens > self.prompt_slots:
            raise GenerationError(f"shared prompt cache: loading {tokens} tokens at slot {start} beyond the prompt "
                                  f"region of {self.prompt_slots} slots")
        self.prompt[:, :, first // self.group, :, start:start + tokens] = kv.to(self.prompt.dtype)
        self.key_valid[rows, start:start + tokens] = True
        self.next_position[rows] = next_position

    def read(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """K/V of one row at the given slots, from whichever region holds each: (L, 2, H, len(slots), D)."""
        slots = slots.to(self.storage.device)
        in_prompt = slots < self.prompt_slots
        c = self.config
        out = self.storage.new_empty(c.num_layers, 2, c.num_kv_heads, len(slots), c.head_dim)
        out[:, :, :, in_prompt] = self.prompt[:, :, row // self.group].index_select(3, slots[in_prompt])
        out[:, :, :, ~in_prompt] = self.storage[:, :, row].index_select(3, slots[~in_prompt] - self.prompt_slots)
        return out


def make_cache(config, batch: int, capacity: int, dtype: torch.dtype, device, group: int = 1,
               prompt_slots: int = 0) -> KVCache:
    """An empty dense `KVCache`, or with `prompt_slots` a `SharedPromptCache` storing that many slots once per
    `group` rows (the `new_cache` that `prefill(..., share_prompt=True)` calls)."""
    if prompt_slots:
        return SharedPromptCache(config, batch, group, prompt_slots, capacity, dtype, device)
    return KVCache(config, batch, capacity, dtype, device)


def cache_maker(model):
    """`new_cache(batch, capacity, group=1, prompt_slots=0)` for a model's caches: its own `make_cache` (a model
    split over devices places each stage's K/V), else `make_cache` on its output head's dtype and device."""
    if hasattr(model, "make_cache"):
        return lambda batch, capacity, group=1, prompt_slots=0: model.make_cache(
            batch, capacity, model.output_weight.dtype, group, prompt_slots)
    weight = model.output_weight
    return lambda batch, capacity, group=1, prompt_slots=0: make_cache(
        model.config, batch, capacity, weight.dtype, weight.device, group, prompt_slots)
