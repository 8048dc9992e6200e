"""Rotary position embedding: tables, rotation, and re-rotation of post-RoPE keys to other positions or bases."""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Rotary tables for integer positions (b, T): cos, sin each (b, 1, T, D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (b, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (b, T, D)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (b, H, T, D) by the rotary tables."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rerotate(keys: torch.Tensor, positions: torch.Tensor, new_positions: torch.Tensor | None = None,
             theta: float = 10000.0, new_theta: float | None = None) -> torch.Tensor:
    """Post-RoPE keys (b, H, T, D) rotated at `positions` (b, T) with base `theta`, re-rotated to
    `new_positions` (default: the same) with base `new_theta` (default: the same), e.g. when K/V crosses models.

    The rotation is undone and redone in fp32 and cast back to the keys' dtype.
    """
    new_positions = positions if new_positions is None else new_positions
    new_theta = theta if new_theta is None else new_theta
    head_dim = keys.shape[-1]
    cos, sin = rope_cos_sin(positions, head_dim, theta, torch.float32)
    plain = apply_rope(keys.float(), cos, -sin)  # rotation by the opposite angle undoes it
    cos, sin = rope_cos_sin(new_positions, head_dim, new_theta, torch.float32)
    return apply_rope(plain, cos, sin).to(keys.dtype)
