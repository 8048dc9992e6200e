"""A decoder split over two devices by layers (pipeline split): layers [0, s) with the token embedding on the
first device, layers [s, L) with the final norm and the output head on the second.

`PipelineModel` wraps a `DecoderLM` and offers what the engine runs (`config`, `output_weight`, `run`), so
`Engine(PipelineModel(model, s, ("cuda:0", "cuda:1")), tokenizer)` generates with every engine feature; a
forward runs the first stage, moves its hidden states (b, T, hidden) to the second device and runs the rest.
Its caches (`PipelineCache`) keep each stage's K/V on that stage's device and the bookkeeping (key validity,
positions, cursor) on the second device, where logits and sampling live; the first stage gets its copy of
the step's positions and masks. Such an engine decodes without CUDA graphs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ember.engine.cache import KVCache, write_rows
from ember.errors import GenerationError
from ember.models.step import StepOutput


class PipelineCache(KVCache):
    """A KVCache whose layers [0, split) live on `devices[0]` and [split, L) on `devices[1]`, as two tensors
    (split, 2, B, H, S, D) and (L - split, 2, B, H, S, D); the bookkeeping lives on `devices[1]`."""

    def __init__(self, config, batch: int, capacity: int, dtype: torch.dtype, split: int, devices):
        self.split, self.devices = split, tuple(torch.device(d) for d in devices)
        super().__init__(config, batch, capacity, dtype, self.devices[1])

    def _allocate(self, dtype: torch.dtype, device) -> torch.Tensor:
        c = self.config
        shape = (2, self.batch, c.num_kv_heads, self.capacity, c.head_dim)
        self.stages = (torch.zeros((self.split, *shape), dtype=dtype, device=self.devices[0]),
                       torch.zeros((c.num_layers - self.split, *shape), dtype=dtype, device=self.devices[1]))
        return self.stages[1]

    @property
    def nbytes(self) -> int:
        return sum(stage.numel() * stage.element_size() for stage in self.stages)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        stage, local = (0, index) if index < self.split else (1, index - self.split)
        return self.stages[stage][local, 0], self.stages[stage][local, 1]

    def _store(self, rows: slice, start: int, kv: torch.Tensor) -> None:
        end = start + kv.shape[3]
        for stage, part in zip(self.stages, (kv[:self.split], kv[self.split:])):
            stage[:, :, rows, :, start:end] = part[:, :, None].to(stage)

    def read(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """K/V of one row at the given slots, both stages on the second device: (L, 2, H, len(slots), D)."""
        parts = [stage[:, :, row].index_select(3, slots.to(stage.device)).to(self.devices[1]) for stage in self.stages]
        return torch.cat(parts)


class _RowView:
    """The rows [first, stop) of a cache as a forward over part of its batch writes them (dynamic steps)."""

    def __init__(self, cache: KVCache, rows: slice):
        self.cache, self.rows = cache, rows

    def write(self, index: int, slots, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(slots, torch.Tensor):
            raise GenerationError("pipeline micro-batches: expected a dynamic step (int slots), found a fixed-shape "
                                  "one")
        cache_k, cache_v = self.cache.layer(index)
        end = slots + k.shape[2]
        return write_rows(cache_k[self.rows], cache_v[self.rows], slots, end, k, v)


def _on(value, device):
    """A step field moved to `device` (tensors only; None and mask markers stay)."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


class PipelineModel(nn.Module):
    """`model`'s layers [0, split) on `devices[0]`, [split, L) on `devices[1]` (the module is moved there).
    With tied embeddings the output head is a copy of the embedding on the second device. `micro_batches` > 1
    cuts each forward's rows into that many parts and queues every part's first stage before the second
    stages, so on two GPUs the second stage of one part runs while the first computes the next."""

    def __init__(self, model, split: int, devices, micro_batches: int = 1):
        super().__init__()
        if micro_batches < 1:
            raise GenerationError(f"pipeline micro_batches: expected >= 1, found {micro_batches}")
        self.micro_batches = micro_batches
        layers = len(model.model.layers)
        if not 0 < split < layers:
            raise GenerationError(f"pipeline split: expected 0 < split < {layers} layers, found {split}")
        if len(devices) != 2:
            raise GenerationError(f"pipeline devices: expected two, found {len(devices)}")
        self.inner, self.split = model, split
        self.devices = tuple(torch.device(d) for d in devices)
        self.config = model.config
        first, second = self.devices
        model.model.embed_tokens.to(first)
        for index, layer in enumerate(model.model.layers):
            layer.to(first if index < split else second)
        model.model.norm.to(second)
        if model.lm_head is not None:
            model.lm_head.to(second)
        self.head = (model.lm_head.weight if model.lm_head is not None
                     else nn.Parameter(model.model.embed_tokens.weight.detach().to(second), requires_grad=False))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.head

    def make_cache(self, batch: int, capacity: int, dtype: torch.dtype, group: int = 1,
                   prompt_slots: int = 0) -> PipelineCache:
        """An empty cache of this split (a prompt region stored once per group is not supported)."""
        if prompt_slots:
            raise GenerationError("pipeline: a prompt region stored once (share_prompt_kv) is not supported")
        return PipelineCache(self.config, batch, capacity, dtype, self.split, self.devices)

    def run(self, step, input_ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> StepOutput:
        """The step over all layers: the first stage on its device, then the second; logits when asked."""
        if step.layers is not None or hidden is not None:
            raise GenerationError("pipeline: runs all layers from token ids (no Step.layers, no hidden input)")
        if step.capture:
            raise GenerationError("pipeline: boundary capture (Step.capture) is not supported")
        first, second = self.devices
        parts = self._parts(step, input_ids.shape[0])
        handed = []  # every micro-batch's first stage is queued before any second stage, so the stages overlap
        for rows, part in parts:
            moved = {name: _on(getattr(part, name), first) for name in ("positions", "mask", "layer_mask")}
            head = dataclasses.replace(part, layers=(0, self.split), logits="none", **moved)
            handed.append(self.inner.run(head, input_ids=input_ids[rows].to(first)).hidden.to(second))
        tail = [self.inner.run(dataclasses.replace(part, layers=(self.split, self.config.num_layers), logits="none"),
                               hidden=hidden).hidden for (_, part), hidden in zip(parts, handed)]
        hidden = torch.cat(tail)  # (b, T, hidden)
        logits = None
        if step.logits != "none":
            last = hidden[:, -1:] if step.logits == "last" else hidden
            logits = torch.nn.functional.linear(self.inner.model.norm(last), self.head)  # (b, T, V)
        return StepOutput(logits, hidden, {})

    def _parts(self, step, rows: int) -> list[tuple[slice, object]]:
        """(forward rows, step over them) of each micro-batch: the rows cut in up to `micro_batches` parts,
        each writing its own rows of the cache."""
        count = min(self.micro_batches, rows)
        if count == 1 or step.kv is None:
            return [(slice(0, rows), step)]
        if step.attend is not None or step.query_hook is not None or step.kv_hook is not None:
            raise GenerationError("pipeline micro-batches: expected a plain step (no attend, query or K/V hooks)")
        group = step.kv.batch // rows  # cache rows per forward row (a prompt's candidates during prefill)
        bounds = [rows * i // count for i in range(count + 1)]
        parts = []
        for a, b in zip(bounds, bounds[1:]):
            rows_ab = slice(a, b)
            fields = {"positions": step.positions[rows_ab], "kv": _RowView(step.kv, slice(a * group, b * group))}
            if isinstance(step.mask, torch.Tensor) and step.mask.shape[0] == rows:  # (1, ...) broadcasts as is
                fields["mask"] = step.mask[rows_ab]
            if step.layer_mask is not None and step.layer_mask.shape[1] == rows:
                fields["layer_mask"] = step.layer_mask[:, rows_ab]
            parts.append((rows_ab, dataclasses.replace(step, **fields)))
        return parts
