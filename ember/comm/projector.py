"""The context-transfer projector: maps a sharer's context K/V into a receiver's cache space when the two
models' caches differ in shape (strong-to-weak: one tokenizer, other depth, heads or head size; cross-family:
the sharer reads the context aligned to the receiver's tokens, one per receiver token, `align.sharer_parts`).

Per receiver layer, separate K and V paths (the fuser's path without the receiver's input: there is none, the
receiver never read the context) read the sharer layer of the fuser's last-aligned layer map. Keys are made
position-free first: the sharer's rotation is undone at the tokens' sharer positions, the path projects, and
the receiver's rotation is applied at the receiver positions, so the learned map never has to model RoPE.
It is trained like the fuser (both LLMs frozen, next-token loss of the receiver's answer tokens), with the
receiver attending to the projected context alone (ember/comm/transfer_training.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.comm.fuser import ProjectPath, flatten_heads, layer_map, unflatten_heads
from ember.errors import CommError
from ember.models.rotary import rerotate


class Projector(nn.Module):
    """The projector of one (receiver, sharer) pair of model configs, `hidden` the width of every path."""

    def __init__(self, receiver_config, sharer_config, hidden: int = 256):
        super().__init__()
        if hidden < 1:
            raise CommError(f"projector hidden width: expected >= 1, found {hidden}")
        self.receiver_shape = (receiver_config.num_layers, receiver_config.num_kv_heads, receiver_config.head_dim)
        self.sharer_shape = (sharer_config.num_layers, sharer_config.num_kv_heads, sharer_config.head_dim)
        self.receiver_theta, self.sharer_theta = receiver_config.rope_theta, sharer_config.rope_theta
        self.hidden = hidden
        self.layer_map = layer_map(receiver_config.num_layers, sharer_config.num_layers)
        layers, heads, dim = self.receiver_shape
        sharer_width = sharer_config.num_kv_heads * sharer_config.head_dim
        self.paths = nn.ModuleList(nn.ModuleList(ProjectPath(sharer_width, heads * dim, hidden) for _ in "kv")
                                   for _ in range(layers))

    def forward(self, sharer_kv: torch.Tensor, sharer_positions: torch.Tensor,
                receiver_positions: torch.Tensor) -> torch.Tensor:
        """Receiver-space K/V (L_r, 2, b, H_r, T, D_r) of the sharer's K/V (L_s, 2, b, H_s, T, D_s) whose keys
        were rotated at `sharer_positions` (b, T); the output's keys are rotated at `receiver_positions` (b, T)."""
        s_layers, s_heads, s_dim = self.sharer_shape
        if sharer_kv.dim() != 6 or tuple(sharer_kv.shape[i] for i in (0, 1, 3, 5)) != (s_layers, 2, s_heads, s_dim):
            raise CommError(f"sharer K/V: expected (L, 2, b, H, T, D) = ({s_layers}, 2, b, {s_heads}, T, {s_dim}), "
                            f"found {tuple(sharer_kv.shape)}")
        rows_tokens = (sharer_kv.shape[2], sharer_kv.shape[4])
        for name, positions in (("sharer", sharer_positions), ("receiver", receiver_positions)):
            if tuple(positions.shape) != rows_tokens:
                raise CommError(f"{name} positions: expected (b, T) = {rows_tokens}, found {tuple(positions.shape)}")
        dtype = next(self.parameters()).dtype
        origin = torch.zeros_like(sharer_positions)
        plain_k = rerotate(sharer_kv[:, 0].float(), sharer_positions, origin, self.sharer_theta).to(dtype)
        values = sharer_kv[:, 1].to(dtype)  # (L_s, b, H_s, T, D_s)
        heads = self.receiver_shape[1]
        keys, vals = [], []
        for t, (k_path, v_path) in enumerate(self.paths):
            source = self.layer_map[t]
            keys.append(unflatten_heads(k_path(flatten_heads(plain_k[source])), heads))  # (b, H_r, T, D_r)
            vals.append(unflatten_heads(v_path(flatten_heads(values[source])), heads))
        keys = rerotate(torch.stack(keys), torch.zeros_like(receiver_positions), receiver_positions,
                        self.receiver_theta)  # (L_r, b, H_r, T, D_r)
        return torch.stack([keys, torch.stack(vals)], dim=1)  # (L_r, 2, b, H_r, T, D_r)
