"""K/V a generation starts from instead of computing it: a received (possibly token-selected) cache.

A `PastKV` holds per-layer K/V (L, 2, H_kv, m, D) computed elsewhere (a sharer model, a fuser, a wire decode)
and the rotary position the prompt that follows it starts at. Keys carry the positions they were computed at
(RoPE is applied before the cache), so m may be smaller than `next_position`: the gaps are tokens that were
never sent. An optional `layer_valid` (L, m) says which layers see which past tokens (e.g. a receiver that
reads a sharer's K/V in selected layers only); a token hidden in every layer is as if it were not sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.errors import GenerationError


@dataclass
class PastKV:
    """K/V (L, 2, H_kv, m, D) placed before a prompt, whose first token gets rotary position `next_position`.

    `layer_valid` (L, m) bool, True where layer l sees past token j; None means every layer sees every token.
    """

    kv: torch.Tensor
    next_position: int
    layer_valid: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.kv.shape[3])

    def check(self, config, index: int) -> None:
        """Raise GenerationError unless the K/V fits a model of `config` (prompt `index` names it)."""
        expected = (config.num_layers, 2, config.num_kv_heads, config.head_dim)
        found = tuple(self.kv.shape[:3]) + tuple(self.kv.shape[4:])
        if self.kv.dim() != 5 or found != expected:
            raise GenerationError(f"past {index}: expected K/V of shape (L, 2, H, m, D) = ({expected[0]}, 2, "
                                  f"{expected[2]}, m, {expected[3]}), found {tuple(self.kv.shape)}")
        if not self.tokens <= self.next_position:
            raise GenerationError(f"past {index}: next_position {self.next_position} must be >= its "
                                  f"{self.tokens} tokens")
        if self.layer_valid is not None:
            layer_valid = self.layer_valid
            if not isinstance(layer_valid, torch.Tensor) or layer_valid.dtype != torch.bool:
                found = layer_valid.dtype if isinstance(layer_valid, torch.Tensor) else type(layer_valid).__name__
                raise GenerationError(f"past {index}: expected layer_valid as a torch.bool tensor, found {found}")
            if tuple(layer_valid.shape) != (config.num_layers, self.tokens):
                raise GenerationError(f"past {index}: expected layer_valid of shape (L, m) = ({config.num_layers}, "
                                      f"{self.tokens}), found {tuple(layer_valid.shape)}")
        if not torch.isfinite(self.kv).all():
            raise GenerationError(f"past {index}: expected finite K/V, found nan or inf")


def concat_past(parts: list[PastKV]) -> PastKV:
    """Several pasts one after another (e.g. a receiver's own head and a received context): K/V joined
    along tokens, the last part's next position. Layer validity is joined too (a part without one is seen by
    every layer); the result has `layer_valid` only if some part had one."""
    if not parts:
        raise GenerationError("concat_past: expected at least one part, found none")
    kv = torch.cat([p.kv for p in parts], dim=3)  # (L, 2, H, m, D)
    layer_valid = None
    if any(p.layer_valid is not None for p in parts):
        layer_valid = torch.cat([
            p.layer_valid.to(kv.device) if p.layer_valid is not None
            else torch.ones(p.kv.shape[0], p.tokens, dtype=torch.bool, device=kv.device)
            for p in parts], dim=1)  # (L, m)
    return PastKV(kv, parts[-1].next_position, layer_valid)
