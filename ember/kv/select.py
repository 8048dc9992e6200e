"""Token selection: which of a context's tokens a sharer sends, scored per token, at a proportion or a byte cap.

Scores are computed over K/V (L, H, T, D) of T context tokens; higher is kept first, ties go to the earlier
token. `proj_vnorm` scores the sharer's V after projection into the receiver's space and `delta_proj_vnorm`
the norm of that projection minus the receiver's own V, so both need those tensors.
"""

from __future__ import annotations

import torch

from ember.errors import CommError
from ember.kv.wire import WireConfig, expected_size

OWN_KV_MODES = ("front", "back", "random", "knorm", "vnorm")  # scored from the sharer's own K/V alone
SELECTION_MODES = OWN_KV_MODES + ("proj_vnorm", "delta_proj_vnorm")


def token_scores(mode: str, k: torch.Tensor, v: torch.Tensor, seed: int = 0, projected_v: torch.Tensor | None = None,
                 receiver_v: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (T,) float64 of each token under `mode` (K, V (L, H, T, D); projected/receiver V in the
    receiver's shape (L', H', T, D'))."""
    if mode not in SELECTION_MODES:
        raise CommError(f"selection mode: expected one of {SELECTION_MODES}, found {mode!r}")
    tokens = k.shape[2]
    if mode == "front":
        return -torch.arange(tokens, dtype=torch.float64)
    if mode == "back":
        return torch.arange(tokens, dtype=torch.float64)
    if mode == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(tokens, generator=generator, dtype=torch.float64)
    if mode == "knorm":
        return _token_norm(k)
    if mode == "vnorm":
        return _token_norm(v)
    if projected_v is None:
        raise CommError(f"selection mode {mode!r} scores the projection into the receiver's space; this transfer "
                        f"has no projection (use knorm or vnorm, or a pair with a fuser)")
    if mode == "proj_vnorm":
        return _token_norm(projected_v)
    if receiver_v is None or receiver_v.shape != projected_v.shape:
        found = None if receiver_v is None else tuple(receiver_v.shape)
        raise CommError(f"delta_proj_vnorm: expected the receiver's own V of shape {tuple(projected_v.shape)}, "
                        f"found {found} (context transfer has no receiver V for the context)")
    return _token_norm(projected_v - receiver_v)


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's values over layers, heads and dims: (L, H, T, D) -> (T,) float64."""
    return x.double().pow(2).sum(dim=(0, 1, 3)).sqrt().cpu()


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Token indices (T,) from the highest score down; equal scores keep token order (deterministic)."""
    return torch.argsort(-scores, stable=True)


def top_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best-scored tokens, in ascending position order (int64)."""
    if not 0 <= count <= len(scores):
        raise CommError(f"token count: expected 0..{len(scores)}, found {count}")
    return ranking(scores)[:count].sort().values


def count_for_proportion(tokens: int, proportion: float) -> int:
    """Tokens kept at a proportion in [0, 1] (rounded to the nearest)."""
    if not 0.0 <= proportion <= 1.0:
        raise CommError(f"proportion: expected a value in [0, 1], found {proportion}")
    return round(proportion * tokens)


def count_for_cap(config: WireConfig, shape: tuple[int, int, int, int], cap: int, context_len: int) -> int:
    """The most tokens of a (L, H, T, D) cache whose KVWire blob at `config` (one precision, no map) fits in
    `cap` bytes; 0 when even an empty blob would not fit (a caller sends nothing then)."""
    layers, heads, tokens, dim = shape

    def size(count: int) -> int:
        return expected_size(config, layers, heads, dim, count, max_position=context_len - 1)

    low, high = 0, tokens  # size is monotone in the count: binary search the largest that fits
    if size(0) > cap:
        return 0
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if size(middle) <= cap else (low, middle - 1)
    return low
