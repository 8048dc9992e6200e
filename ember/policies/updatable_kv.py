"""UpdatableKV(k): cached K and V of every layer whose k or v projection changed are corrected with the low-rank
change of the adapter applied to the layer's stored input hidden states (keys rotated at their positions);
other layers are reused as they are; every k-th update flushes everything. Exact at the first changed layer
only: deeper layers' stored inputs are stale, and their error is measured, not assumed. It stores the input
hidden states of every layer with each cached block (hidden_size values per token and layer, against
2 x kv_heads x head_dim for K/V), counted in the prefix cache's bytes held."""

from __future__ import annotations

from ember.engine.refresh import changed_kv_layers
from ember.policies.base import CORRECT, REUSE, Decision, PeriodicPolicy, Update


class UpdatableKV(PeriodicPolicy):
    def boundary_layers(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers))

    def between_refreshes(self, update: Update) -> Decision:
        changed = set(changed_kv_layers(update.old_adapter, update.new_adapter, update.num_layers))
        return Decision(tuple(CORRECT if layer in changed else REUSE for layer in range(update.num_layers)))
