"""UpdateLocality(N): the adapter trains only layers >= N, so K/V of layers < N stays valid across updates;
layers >= N are recomputed from the input hidden states of layer N stored with every cached block. Exact."""

from __future__ import annotations

from ember.policies.base import RECOMPUTE, REUSE, CachePolicy, Decision, PolicyError, Update, policy_int


class UpdateLocality(CachePolicy):
    def __init__(self, frozen_layers: int):
        self.frozen_layers = policy_int(frozen_layers, 0, "UpdateLocality: frozen depth N")

    @property
    def name(self) -> str:
        return f"UpdateLocality(N={self.frozen_layers})"

    def boundary_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.frozen_layers > num_layers:
            raise PolicyError(f"UpdateLocality: frozen depth N: expected <= {num_layers} layers, found "
                              f"{self.frozen_layers}")
        return (self.frozen_layers,) if self.frozen_layers < num_layers else ()

    def decide(self, update: Update) -> Decision:
        n, depth = self.frozen_layers, update.valid_depth
        if depth < n:
            raise PolicyError(f"UpdateLocality(N={n}): the update changed layer {depth} < N; expected an adapter "
                              f"that trains only layers >= {n} (LoraAdapter.create(..., layers=range({n}, L)))")
        return Decision((REUSE,) * n + (RECOMPUTE,) * (update.num_layers - n))
