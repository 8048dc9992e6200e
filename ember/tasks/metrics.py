"""Accuracy with a confidence interval (Wilson score), shared by every task."""

from __future__ import annotations

import math


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of a proportion; (0, 1) when total is 0."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def accuracy(flags: list[bool]) -> dict:
    """{'accuracy', 'ci_low', 'ci_high', 'n'} of per-item correctness."""
    low, high = wilson_interval(sum(flags), len(flags))
    return {"accuracy": sum(flags) / len(flags) if flags else float("nan"), "ci_low": low, "ci_high": high,
            "n": len(flags)}
