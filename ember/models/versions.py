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

_CHUNK = 1 << 22  # elements reduced at a time for the fingerprint (bounds the int64 temporaries)
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed int64: spreads positions over all bits
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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
    """A hash of the config, dtype and every weight's exact content: per parameter, the wrapping int64 sum of its
    values' bit patterns times odd position-dependent constants, reduced on the weights' device in chunks (one
    small transfer). Any change of a single value, or a swap of two, changes it."""
    h = hashlib.sha256(json.dumps(model.config.as_dict(), sort_keys=True).encode())
    sums = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            h.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            if param.numel() == 0:
                continue
            bits = param.detach().reshape(-1).view(_INT_OF_SIZE[param.element_size()])  # (n,) raw bit patterns
            total = torch.zeros((), dtype=torch.int64, device=param.device)
            for start in range(0, bits.numel(), _CHUNK):
                chunk = bits[start:start + _CHUNK].long()
                index = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=param.device)
                total += (chunk * (index * _GOLDEN | 1)).sum()  # int64 arithmetic wraps: exact, order-free
            sums.append(total)
        if sums:
            h.update(torch.stack(sums).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def layer_versions(fingerprint: str, num_layers: int, adapter_digests: dict[int, str] | None = None) -> LayerVersions:
    """Cumulative per-layer versions: the base fingerprint, changed at each adapted layer and carried up."""
    current, layers = fingerprint, []
    for index in range(num_layers):
        if adapter_digests and index in adapter_digests:
            current = hashlib.sha256(f"{current}|{index}|{adapter_digests[index]}".encode()).hexdigest()[:16]
        layers.append(current)
    return LayerVersions(fingerprint, tuple(layers))
