"""Per-layer versions of K/V: what weights made a layer's keys and values.

Layer i's K/V depend on every weight at or below layer i. A version is therefore cumulative: the base model's
fingerprint (config, dtype, a content checksum of every weight) hashed with the adapter content of each adapted layer at
or below i. Layers below the first adapted layer keep the base version, so after a swap to an adapter that
touches only layers >= N, cached K/V stays valid to depth N. Nobody sets versions by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

_CHUNK = 1 << 22  # elements reduced at a time for the fingerprint (bounds the fp32 temporary)


@dataclass(frozen=True)
class LayerVersions:
    """The fingerprint of the base model and one cumulative version per layer."""

    model: str
    layers: tuple[str, ...]

    def reusable_depth(self, cached: tuple[str, ...]) -> int:
        """How many leading layers of K/V made under `cached` versions are valid under these."""
        for index, (mine, theirs) in enumerate(zip(self.layers, cached)):
            if mine != theirs:
                return index
        return min(len(self.layers), len(cached))


def model_fingerprint(model) -> str:
    """A hash of the config, dtype and every weight's content: per row of each parameter its fp32 sum and sum of
    squares, reduced on the weights' device in chunks (one small transfer), so any change of a value is seen."""
    h = hashlib.sha256(json.dumps(model.config.as_dict(), sort_keys=True).encode())
    sums = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            rows = param.detach().reshape(param.shape[0] if param.dim() > 1 else 1, -1)  # (rows, cols)
            for chunk in torch.split(rows, max(1, _CHUNK // rows.shape[1])):
                wide = chunk.float()
                sums.append(torch.stack([wide.sum(-1), (wide * wide).sum(-1)], dim=-1).reshape(-1))  # (2 rows,)
        h.update(torch.cat(sums).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def layer_versions(fingerprint: str, num_layers: int, adapter_digests: dict[int, str] | None = None) -> LayerVersions:
    """Cumulative per-layer versions: the base fingerprint, changed at each adapted layer and carried up."""
    current, layers = fingerprint, []
    for index in range(num_layers):
        if adapter_digests and index in adapter_digests:
            current = hashlib.sha256(f"{current}|{index}|{adapter_digests[index]}".encode()).hexdigest()[:16]
        layers.append(current)
    return LayerVersions(fingerprint, tuple(layers))
