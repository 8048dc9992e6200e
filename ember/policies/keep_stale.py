"""KeepStale: every cached prefix is kept forever and reused as it is, whatever the updates changed."""

from __future__ import annotations

from ember.policies.base import CachePolicy, Decision, Update


class KeepStale(CachePolicy):
    exact = False

    def decide(self, update: Update) -> Decision:
        return Decision.keep(update)
