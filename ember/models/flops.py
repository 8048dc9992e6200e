"""Forward-pass FLOP counts of the decoder, for bounds such as 'the prefix fraction of prefill FLOPs'."""

from __future__ import annotations

from ember.models.config import ModelConfig


def linear_flops_per_token(config: ModelConfig) -> int:
    """2 x multiply-accumulates of every projection of one token (embedding lookup and lm_head excluded)."""
    hidden, heads, kv, dim = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    attention = hidden * heads * dim * 2 + hidden * kv * dim * 2  # q, o and k, v projections
    mlp = 3 * hidden * config.intermediate_size
    return 2 * config.num_layers * (attention + mlp)


def prefill_flops(config: ModelConfig, new_tokens: int, past_tokens: int = 0) -> int:
    """FLOPs to prefill `new_tokens` after `past_tokens` already in the cache (causal attention: the i-th
    new token attends to past + i keys; QK^T and AV cost 2 x 2 x heads x head_dim per key)."""
    keys = new_tokens * past_tokens + new_tokens * (new_tokens + 1) // 2
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * keys
    return linear_flops_per_token(config) * new_tokens + attention
