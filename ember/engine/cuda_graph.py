"""A CUDA graph of one decode step: all kernels of a token's forward pass replayed in a single launch.

Decode of small batches is bound by kernel-launch overhead in eager PyTorch; replaying a captured graph
removes it. The graph runs the decoder's static step (fixed shapes, device-side cache slot) over one cache.
"""

from __future__ import annotations

import torch

from ember.engine.cache import KVCache


class DecodeGraph:
    """Captured static decode step for one (model, cache) pair. `step(tokens (B,))` returns logits (B, V)."""

    def __init__(self, model, cache: KVCache):
        self.cache = cache
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=cache.storage.device)  # (B, 1)
        cache.sync_slot()
        saved = self._save()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture (library handles, workspaces)
            model(self.tokens, cache, static=True)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache, static=True)[:, -1]  # (B, V), static buffer
        self._restore(saved)  # capture ran the host-side bookkeeping once; kernels did not run

    def _save(self):
        c = self.cache
        return c.key_valid.clone(), c.lengths.clone(), c.slot.clone(), c.length

    def _restore(self, saved) -> None:
        c = self.cache
        c.key_valid.copy_(saved[0])
        c.lengths.copy_(saved[1])
        c.slot.copy_(saved[2])
        c.length = saved[3]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,), advance the cache, return the next logits (B, V) (a reused buffer)."""
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        self.cache.length += 1
        return self.logits
