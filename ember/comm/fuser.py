"""The cache fuser of shared-context fusion (DESIGN.md section 8): per receiver layer, separate K and V paths.

For each token, a path takes the sharer's K (or V) and the receiver's K (or V) of that token (post-RoPE, heads
flattened), concatenates them, projects to a hidden width h, applies a residual feed-forward block (RMSNorm,
Linear, GELU, Linear), then two heads: a projection back to the receiver's KV width and a per-token, per-head
weight (sigmoid). A learned scalar gate per layer and per K/V decides whether the layer fuses: a Gumbel-sigmoid
whose temperature is annealed during training, a hard on/off at inference. Output: receiver + gate x weight x
projection, so the receiver's own cache always stays. Receiver layer t reads sharer layer
clamp(t - (L_receiver - L_sharer), 0, L_sharer - 1): the last layers are aligned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import CommError

GATE_INIT = 0.5  # initial gate logit: every layer fuses until training closes it


def layer_map(receiver_layers: int, sharer_layers: int) -> list[int]:
    """The sharer layer each receiver layer reads (last-aligned, clamped at the sharer's first and last)."""
    if receiver_layers < 1 or sharer_layers < 1:
        raise CommError(f"layer map: expected >= 1 layers on each side, found {receiver_layers}, {sharer_layers}")
    offset = receiver_layers - sharer_layers
    return [min(max(t - offset, 0), sharer_layers - 1) for t in range(receiver_layers)]


class ProjectPath(nn.Module):
    """A token-wise map (b, T, W_in) -> (b, T, W_out): a projection to width h, a residual feed-forward block
    (RMSNorm, Linear, GELU, Linear), and a projection to W_out."""

    def __init__(self, in_width: int, out_width: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.inp = nn.Linear(in_width, hidden)
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, hidden)
        self.down = nn.Linear(hidden, hidden)
        self.project = nn.Linear(hidden, out_width)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(b, T, W_in) -> (b, T, h), before the output projection."""
        x = self.inp(x)
        return x + self.down(F.gelu(self.up(self.norm(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))


class FusePath(ProjectPath):
    """One K (or V) path of one layer: (b, T, W_sharer), (b, T, W_receiver) -> projection (b, T, W_receiver)
    and weight (b, T, H_receiver)."""

    def __init__(self, sharer_width: int, receiver_width: int, receiver_heads: int, hidden: int, eps: float = 1e-6):
        super().__init__(sharer_width + receiver_width, receiver_width, hidden, eps)
        self.receiver_heads = receiver_heads
        self.weight = nn.Linear(hidden, receiver_heads)

    def forward(self, sharer: torch.Tensor, receiver: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(torch.cat([sharer, receiver], dim=-1))  # (b, T, h)
        return self.project(x), torch.sigmoid(self.weight(x))  # (b, T, W_r), (b, T, H_r)


def flatten_heads(x: torch.Tensor) -> torch.Tensor:
    """(b, H, T, D) -> (b, T, H * D)."""
    b, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(b, tokens, heads * dim)


def unflatten_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, T, H * D) -> (b, H, T, D)."""
    b, tokens, width = x.shape
    return x.view(b, tokens, heads, width // heads).transpose(1, 2)


class Fuser(nn.Module):
    """The fuser for one (receiver, sharer) pair of model configs, with `hidden` the width h of every path."""

    def __init__(self, receiver_config, sharer_config, hidden: int = 256):
        super().__init__()
        if hidden < 1:
            raise CommError(f"fuser hidden width: expected >= 1, found {hidden}")
        self.receiver_shape = (receiver_config.num_layers, receiver_config.num_kv_heads, receiver_config.head_dim)
        self.sharer_shape = (sharer_config.num_layers, sharer_config.num_kv_heads, sharer_config.head_dim)
        self.hidden = hidden
        self.layer_map = layer_map(receiver_config.num_layers, sharer_config.num_layers)
        layers, heads, dim = self.receiver_shape
        sharer_width = sharer_config.num_kv_heads * sharer_config.head_dim
        self.paths = nn.ModuleList(nn.ModuleList(FusePath(sharer_width, heads * dim, heads, hidden) for _ in "kv")
                                   for _ in range(layers))
        for layer in self.paths:  # the projection head starts at zero: an untrained fuser is the receiver itself
            for path in layer:
                nn.init.zeros_(path.project.weight)
                nn.init.zeros_(path.project.bias)
        self.gate_logits = nn.Parameter(torch.full((layers, 2), GATE_INIT))  # (L_r, K/V): open at the start
        self.temperature = 1.0

    def gates(self) -> torch.Tensor:
        """(L_r, 2) gate values: a Gumbel-sigmoid sample at the current temperature in training, 0/1 in eval."""
        if not self.training:
            return (self.gate_logits > 0).to(self.gate_logits.dtype)
        uniform = torch.rand_like(self.gate_logits).clamp(1e-6, 1 - 1e-6)
        noise = torch.log(uniform) - torch.log1p(-uniform)
        return torch.sigmoid((self.gate_logits + noise) / self.temperature)

    def check(self, receiver_kv: torch.Tensor, sharer_kv: torch.Tensor) -> None:
        layers, heads, dim = self.receiver_shape
        s_layers, s_heads, s_dim = self.sharer_shape
        if receiver_kv.dim() != 6 or tuple(receiver_kv.shape[i] for i in (0, 1, 3, 5)) != (layers, 2, heads, dim):
            raise CommError(f"receiver K/V: expected (L, 2, b, H, T, D) = ({layers}, 2, b, {heads}, T, {dim}), "
                            f"found {tuple(receiver_kv.shape)}")
        if sharer_kv.dim() != 6 or tuple(sharer_kv.shape[i] for i in (0, 1, 3, 5)) != (s_layers, 2, s_heads, s_dim):
            raise CommError(f"sharer K/V: expected (L, 2, b, H, T, D) = ({s_layers}, 2, b, {s_heads}, T, {s_dim}), "
                            f"found {tuple(sharer_kv.shape)}")
        if receiver_kv.shape[2] != sharer_kv.shape[2] or receiver_kv.shape[4] != sharer_kv.shape[4]:
            raise CommError(f"fuser: expected one sharer token per receiver token (same b and T), found receiver "
                            f"{tuple(receiver_kv.shape)} and sharer {tuple(sharer_kv.shape)} (align tokens first)")

    def forward(self, receiver_kv: torch.Tensor, sharer_kv: torch.Tensor,
                projection_only: bool = False) -> torch.Tensor:
        """Fused K/V (L_r, 2, b, H_r, T, D_r) from the receiver's (L_r, 2, b, H_r, T, D_r) and the sharer's
        (L_s, 2, b, H_s, T, D_s) K/V of the same (aligned) tokens. `projection_only` returns the projections
        alone (the control that replaces the receiver's cache)."""
        self.check(receiver_kv, sharer_kv)
        heads = self.receiver_shape[1]
        gates = self.gates()
        fused = []
        for t, paths in enumerate(self.paths):
            out = []
            for role, path in enumerate(paths):
                mine = receiver_kv[t, role]  # (b, H_r, T, D_r)
                theirs = sharer_kv[self.layer_map[t], role].to(mine.dtype)  # (b, H_s, T, D_s)
                projection, weight = path(flatten_heads(theirs), flatten_heads(mine))  # (b, T, W_r), (b, T, H_r)
                projection = unflatten_heads(projection, heads)  # (b, H_r, T, D_r)
                if projection_only:
                    out.append(projection)
                else:
                    out.append(mine + gates[t, role] * weight.transpose(1, 2)[..., None] * projection)
            fused.append(torch.stack(out))
        return torch.stack(fused)  # (L_r, 2, b, H_r, T, D_r)

    def anneal(self, progress: float, start: float = 1.0, end: float = 0.001) -> float:
        """Set the gate temperature for training progress in [0, 1] (geometric from start to end)."""
        progress = min(max(progress, 0.0), 1.0)
        self.temperature = start * (end / start) ** progress
        return self.temperature
