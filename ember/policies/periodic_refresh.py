"""PeriodicRefresh(k): stale K/V is reused, and every k-th update flushes everything (a full refresh)."""

from __future__ import annotations

from ember.policies.base import Decision, PeriodicPolicy, Update


class PeriodicRefresh(PeriodicPolicy):
    def between_refreshes(self, update: Update) -> Decision:
        return Decision.keep(update)
