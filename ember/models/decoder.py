"""Compact llama-style decoder (llama / qwen2 / qwen3) whose parameter names match Hugging Face checkpoints.

The module holds weights only; all generation state lives in the `KVCache` passed to `forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from ember.engine.cache import KVCache
from ember.models.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm normalized in fp32 (one fused kernel), cast back, then scaled: the reference's rounding order."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, cache: KVCache, start: int, mask, causal: bool):
        rows, steps, _ = x.shape
        q = self.q_proj(x).view(rows, steps, self.num_heads, self.head_dim)  # (b, T, H, D)
        k = self.k_proj(x).view(rows, steps, self.num_kv_heads, self.head_dim)  # (b, T, Hkv, D)
        v = self.v_proj(x).view(rows, steps, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (b, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (b, Hkv, T, D)
        keys, values = cache.write(self.index, start, k, v.transpose(1, 2))  # (b, Hkv, start+T, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(rows, steps, -1))  # (b, T, hidden)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.self_attn = Attention(config, index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache, start, mask, causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start, mask, causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderLM(nn.Module):
    """Causal LM: `forward(input_ids, positions, cache, start)` appends to the cache and returns logits."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None,
                last_only: bool = False, static: bool = False) -> torch.Tensor:
        """Append tokens (b, T) to the cache and return logits (b, T, V), or (b, 1, V) with `last_only`.

        `valid` (b, T) marks real tokens (False for left padding); rotary positions and key masks follow from
        it and from what the cache already holds. b may divide the cache batch (prefill shared by a group).
        `static` runs a one-token decode step over all cache rows with fixed shapes (CUDA-graph capturable).
        """
        if static:
            start, positions = None, cache.reserve_static()
            mask, causal = cache.key_valid[:, None, None, :], False  # (B, 1, 1, S)
        else:
            start, positions = cache.reserve(input_ids.shape[0], input_ids.shape[1], valid)
            mask, causal = attention_mask(cache, input_ids.shape[0], start, input_ids.shape[1])
        x = self.model.embed_tokens(input_ids)  # (b, T, hidden)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start, mask, causal)
        if static:
            cache.advance_static()
        if last_only:
            x = x[:, -1:]
        return F.linear(self.model.norm(x), self.output_weight)  # (b, T, V)

    @torch.inference_mode()
    def full_logits(self, input_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Reference path: logits (b, T, V) of whole sequences in one pass from a fresh cache."""
        cache = KVCache(self.config, input_ids.shape[0], input_ids.shape[1], self.output_weight.dtype, input_ids.device)
        return self(input_ids, cache, valid)


def attention_mask(cache: KVCache, rows: int, start: int, steps: int):
    """Mask for queries at slots [start, start+T) over keys [0, start+T): (mask | None, is_causal).

    Without padding, causal attention needs no explicit mask (fast kernels): none for one query, `is_causal`
    from slot 0, a lower-right causal bias after cached slots. With padding, a query may see valid
    keys at or before its slot; it always sees itself so a padding query never has an empty row.
    """
    end = start + steps
    if not cache.has_padding:
        if steps == 1:
            return None, False
        if start == 0:
            return None, True
        return causal_lower_right(steps, end), False  # after a reused prefix: fused kernels still apply
    device = cache.key_valid.device
    query_slot = torch.arange(start, end, device=device)[:, None]  # (T, 1)
    key_slot = torch.arange(end, device=device)[None, :]  # (1, S')
    visible = (key_slot <= query_slot)[None] & cache.key_mask(rows, end)[:, None, :]  # (b, T, S')
    visible |= (key_slot == query_slot)[None]
    return visible[:, None], False
