"""PrefixOnly: shared prefixes are reused within a round; every cached prefix is flushed at each update."""

from __future__ import annotations

from ember.policies.base import CachePolicy, Decision, Update


class PrefixOnly(CachePolicy):
    def decide(self, update: Update) -> Decision:
        return Decision.flush()
