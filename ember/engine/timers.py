"""Stage timers: CUDA events on GPU, perf_counter on CPU (where ops are synchronous)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

STAGES = ("prefill", "decode", "sampling", "transfer")


class StageTimer:
    """Accumulates wall time per named stage. Read `totals()` once, after the work (it syncs CUDA once)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._seconds: dict[str, float] = {}
        self._events: list[tuple[str, object, object]] = []

    @contextmanager
    def stage(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            began = time.perf_counter()
            yield
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - began

    def totals(self) -> dict[str, float]:
        """Seconds per stage, every stage in STAGES present (0 if unused)."""
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self._seconds[name] = self._seconds.get(name, 0.0) + start.elapsed_time(end) / 1000.0
            self._events.clear()
        return {name: self._seconds.get(name, 0.0) for name in dict.fromkeys(STAGES + tuple(self._seconds))}
