"""A CUDA graph of one decode step: all kernels of a token's forward pass replayed in a single launch.

Decode of small batches is bound by kernel-launch overhead in eager PyTorch; replaying a captured graph
removes it. The graph runs the fixed-shape step (`ember.engine.steps.static_step`) over one cache whose
buffers persist: the engine keeps one cache per (batch, capacity) bucket and captures its graph once, on the
empty cache, before any prefill; every later call resets the cache and replays. The step's bookkeeping is
device-side only, so capture needs no host state saved or restored.
"""

from __future__ import annotations

import torch

from ember.engine.cache import KVCache
from ember.engine.steps import static_step


class DecodeGraph:
    """Captured fixed-shape decode step for one (model, cache). `step(tokens (B,))` returns logits (B, V)."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.storage.device)  # (B, 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (library handles, workspaces)
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()  # (B, V), static buffer
        cache.reset()  # the warm-up wrote one token into the empty cache

    def _forward(self) -> torch.Tensor:
        step = static_step(self.cache, logits="last")
        logits = self.model.run(step, input_ids=self.tokens).logits[:, -1]
        self.cache.advance_static()
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,), advance the cache, return the next logits (B, V) (a reused buffer).
        Call `cache.sync_slot()` once before the first step after a prefill."""
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        self.cache.length += 1
        return self.logits
