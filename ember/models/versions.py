"""Per-layer versions of K/V: what weights made a layer's keys and values.

Layer i's K/V depend on every weight at or below layer i. A version is therefore cumulative: the base model's
fingerprint (config, dtype, a sample of every weight) hashed with the adapter content of each adapted layer at
or below i. Layers below the first adapted layer keep the base version, so after a swap to an adapter that
touches only layers >= N, cached K/V stays valid to depth N. Nobody sets versions by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

_SAMPLES = 64  # values sampled per weight tensor for the fingerprint


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
    """A hash of the config, dtype and an evenly strided sample of every parameter (cheap on any size)."""
    h = hashlib.sha256(json.dumps(model.config.as_dict(), sort_keys=True).encode())
    samples = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            flat = param.detach().reshape(-1)
            count = min(_SAMPLES, flat.numel())
            index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
            samples.append(flat[index].float())
        h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def layer_versions(fingerprint: str, num_layers: int, adapter_digests: dict[int, str] | None = None) -> LayerVersions:
    """Cumulative per-layer versions: the base fingerprint, changed at each adapted layer and carried up."""
    current, layers = fingerprint, []
    for index in range(num_layers):
        if adapter_digests and index in adapter_digests:
            current = hashlib.sha256(f"{current}|{index}|{adapter_digests[index]}".encode()).hexdigest()[:16]
        layers.append(current)
    return LayerVersions(fingerprint, tuple(layers))
