"""The cache-policy interface: what a policy sees at an adapter update and what it may decide.

After each update the policy returns one `Decision` for the cached prefixes made under the weights before it:
per layer, reuse the cached K/V (valid, or knowingly stale), recompute it (from stored boundary hidden states),
or correct it (with the low-rank change of the adapter); or drop every cached prefix. The policy runner
(`ember.policies.runner`) applies the decision to the engine's prefix cache and keeps the policy's stats.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import PolicyError
from ember.models.lora import LoraAdapter
from ember.models.versions import LayerVersions

REUSE, RECOMPUTE, CORRECT = "reuse", "recompute", "correct"


@dataclass(frozen=True)
class Update:
    """One adapter update: its 1-based index, the per-layer versions and adapters before and after."""

    index: int
    before: LayerVersions
    after: LayerVersions
    old_adapter: LoraAdapter | None
    new_adapter: LoraAdapter | None

    @property
    def valid_depth(self) -> int:
        """Leading layers whose K/V the update left valid (the first layer whose version changed)."""
        return self.after.reusable_depth(self.before.layers)

    @property
    def num_layers(self) -> int:
        return len(self.after.layers)


@dataclass(frozen=True)
class Decision:
    """What to do with every cached prefix: one action per layer, or `drop` (recomputed when next asked for)."""

    layers: tuple[str, ...] = ()
    drop: bool = False

    @classmethod
    def flush(cls) -> "Decision":
        return cls(drop=True)

    @classmethod
    def keep(cls, update: Update) -> "Decision":
        """Reuse every layer as it is (valid layers and stale ones alike)."""
        return cls((REUSE,) * update.num_layers)


class CachePolicy:
    """Base class. `caches`: whether generation uses a prefix cache at all; `boundary_layers`: the layers whose
    input hidden states the prefix cache must store for this policy's recomputes or corrections."""

    caches = True
    exact = True  # whether reused K/V always equals a fresh recompute

    @property
    def name(self) -> str:
        return type(self).__name__

    def boundary_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers whose input hidden states every cached block must store for this policy (none by default)."""
        return ()

    def decide(self, update: Update) -> Decision:
        """What to do with the cached prefixes after `update`."""
        raise NotImplementedError


def policy_int(value, low: int, what: str) -> int:
    """A policy parameter that must be an integer >= `low` (bools refused); PolicyError naming `what` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PolicyError(f"{what}: expected an integer >= {low}, found {value!r}")
    return value


class PeriodicPolicy(CachePolicy):
    """A policy that flushes every cached prefix at every k-th update (a full refresh) and decides the updates
    in between with `between_refreshes`."""

    exact = False

    def __init__(self, k: int):
        self.k = policy_int(k, 1, f"{type(self).__name__}: refresh period k")

    @property
    def name(self) -> str:
        return f"{type(self).__name__}(k={self.k})"

    def decide(self, update: Update) -> Decision:
        return Decision.flush() if update.index % self.k == 0 else self.between_refreshes(update)

    def between_refreshes(self, update: Update) -> Decision:
        """The decision at an update that is not a refresh."""
        raise NotImplementedError
