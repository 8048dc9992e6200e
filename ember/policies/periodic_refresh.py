"""PeriodicRefresh(k): stale K/V is reused, and every k-th update flushes everything (a full refresh)."""

from __future__ import annotations

from ember.policies.base import CachePolicy, Decision, Update, check_period


class PeriodicRefresh(CachePolicy):
    exact = False

    def __init__(self, k: int):
        self.k = check_period(k, "PeriodicRefresh")

    @property
    def name(self) -> str:
        return f"PeriodicRefresh(k={self.k})"

    def decide(self, update: Update) -> Decision:
        return Decision.flush() if update.index % self.k == 0 else Decision.keep(update)
