"""Naive: nothing is cached; every prompt is prefilled in full every round (candidates still share one prefill)."""

from __future__ import annotations

from ember.policies.base import CachePolicy, Decision, Update


class Naive(CachePolicy):
    caches = False

    def decide(self, update: Update) -> Decision:
        return Decision.flush()
