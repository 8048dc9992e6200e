"""Stage timers: CUDA events on GPU, perf_counter on CPU (where ops are synchronous)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

STAGES = ("prefill", "decode", "sampling", "transfer")


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats: int, warmup: int = 0) -> float:
    """Median wall seconds of `fn()` over `repeats` calls after `warmup` untimed ones, the device synchronized
    around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


class StageTimer:
    """Accumulates wall time per named stage. Read `totals()` once, after the work (it syncs CUDA once).

    Stages may nest (e.g. a graph capture inside a prefill); a stage's time excludes its nested stages', so
    every second is counted once.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._spans: list[list] = []  # [name, parent index or None, seconds or (start event, end event)]
        self._open: list[int] = []

    @contextmanager
    def stage(self, name: str):
        self._spans.append([name, self._open[-1] if self._open else None, None])
        index = len(self._spans) - 1
        self._open.append(index)
        try:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                try:
                    yield
                finally:
                    end.record()
                    self._spans[index][2] = (start, end)
            else:
                began = time.perf_counter()
                try:
                    yield
                finally:
                    self._spans[index][2] = time.perf_counter() - began
        finally:
            self._open.pop()

    def totals(self) -> dict[str, float]:
        """Seconds per stage (nested stages excluded), every stage in STAGES present (0 if unused)."""
        if self.cuda and self._spans:
            torch.cuda.synchronize()
        elapsed = [span[2] if not isinstance(span[2], tuple) else span[2][0].elapsed_time(span[2][1]) / 1000.0
                   for span in self._spans]
        exclusive = list(elapsed)
        for (_, parent, _), seconds in zip(self._spans, elapsed):
            if parent is not None:
                exclusive[parent] -= seconds
        seconds = {}
        for (name, _, _), value in zip(self._spans, exclusive):
            seconds[name] = seconds.get(name, 0.0) + value
        return {name: seconds.get(name, 0.0) for name in dict.fromkeys(STAGES + tuple(seconds))}
