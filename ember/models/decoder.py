"""Compact llama-style decoder (llama / qwen2 / qwen3) whose parameter names match Hugging Face checkpoints.

The module holds weights only. Every forward consumes a `Step` (ember.models.step) built by its caller: the
engine's steps write to and read from a KV cache, a training step is plain causal attention with no cache.
`model(input_ids, attention_mask)` is that plain forward: logits (b, T, V), differentiable end to end.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ember.errors import StepError
from ember.models import dispatch
from ember.models.config import ModelConfig
from ember.models.lora import LoraLinear
from ember.models.rotary import apply_rope, rope_cos_sin
from ember.models.step import Step, StepOutput, causal_step


class RMSNorm(nn.Module):
    """RMSNorm normalized in fp32 or wider (one fused kernel), cast back, then scaled: the reference's rounding
    order."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * F.rms_norm(wide, (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = LoraLinear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = LoraLinear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = LoraLinear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = LoraLinear(self.num_heads * self.head_dim, hidden, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        rows, steps, _ = x.shape
        q = self.q_proj(x).view(rows, steps, self.num_heads, self.head_dim)  # (b, T, H, D)
        k = self.k_proj(x).view(rows, steps, self.num_kv_heads, self.head_dim)  # (b, T, Hkv, D)
        v = self.v_proj(x).view(rows, steps, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (b, H, T, D)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (b, Hkv, T, D)
        v = v.transpose(1, 2)  # (b, Hkv, T, D)
        if step.kv_hook is not None:
            k, v = step.kv_hook(self.index, k, v)
        keys, values = (k, v) if step.kv is None else step.kv.write(self.index, step.slots, k, v)  # (b, Hkv, S, D)
        mask = step.mask
        if step.layer_mask is not None:
            mask = mask & step.layer_mask[self.index, ..., :keys.shape[2]]  # (b, 1, T, S)
        if step.query_hook is not None:
            step.query_hook(self.index, q, keys, mask)
        if step.attend is not None:  # the store attends over K/V it keeps beside what `write` returned
            if dispatch.recording_now():
                dispatch.note("attention", "shared-prompt")
            out = step.attend(self.index, q, keys, values)  # (b, H, T, D)
        else:
            causal = step.causal and mask is None
            if dispatch.recording_now():
                dispatch.note("attention", dispatch.attention_path(q, keys, values, mask, causal,
                                                                   step.layer_mask is not None))
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(rows, steps, -1))  # (b, T, hidden)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = LoraLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = LoraLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = LoraLinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.self_attn = Attention(config, index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, step: Step):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderLM(nn.Module):
    """Causal LM. `forward(input_ids, attention_mask)` is the plain causal pass; `run(step, ...)` runs a step
    built by a caller (cache writes, layer ranges, boundary states, K/V hooks).

    `gradient_checkpointing` recomputes each layer in the backward pass of cache-free steps instead of
    keeping its activations.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (b, T, V) of whole sequences (b, T) with plain causal attention and no cache.

        `attention_mask` (b, T) marks real tokens (0 for left padding or removed tokens); positions default to
        each real token's index among its row's real tokens, or pass explicit `positions` (b, T).
        """
        step = causal_step(tuple(input_ids.shape), attention_mask, positions, device=input_ids.device)
        return self.run(step, input_ids=input_ids).logits

    def run(self, step: Step, input_ids: torch.Tensor | None = None,
            hidden: torch.Tensor | None = None) -> StepOutput:
        """Run layers [a, b) of `step.layers` (all by default) on token ids (b, T) when a == 0, or on the input
        hidden states (b, T, hidden) of layer a. Returns logits when the range ends at the last layer, the
        hidden states after layer b - 1, and the input hidden states of the layers in `step.capture`."""
        layers = self.model.layers
        start, stop = step.layers or (0, len(layers))
        if not 0 <= start < stop <= len(layers):
            raise StepError(f"Step.layers: expected 0 <= a < b <= {len(layers)}, found [{start}, {stop})")
        if step.layer_mask is not None and step.layer_mask.shape[0] != len(layers):
            raise StepError(f"Step.layer_mask: expected one mask per layer ({len(layers)}), found "
                            f"{step.layer_mask.shape[0]}")
        if hidden is None and (start > 0 or input_ids is None):
            raise StepError(f"run: layers from {start} need {'input_ids' if start == 0 else 'hidden states'}")
        x = self.model.embed_tokens(input_ids) if hidden is None else hidden  # (b, T, hidden)
        cos, sin = rope_cos_sin(step.positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        with dispatch.recording((start, stop)) if dispatch.enabled() else nullcontext():
            x, boundary = self._layers(step, x, cos, sin, start, stop)
        logits = None
        if stop == len(layers) and step.logits != "none":
            last = x[:, -1:] if step.logits == "last" else x
            logits = F.linear(self.model.norm(last), self.output_weight)  # (b, T, V)
        return StepOutput(logits, x, boundary)

    def _layers(self, step: Step, x: torch.Tensor, cos, sin, start: int, stop: int):
        """Layers [start, stop) on x (b, T, hidden): the output and the captured boundary states."""
        layers = self.model.layers
        boundary = {}
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and step.kv is None
        for index in range(start, stop):
            dispatch.at_layer(index)
            if index in step.capture:
                boundary[index] = x
            if recompute:
                x = checkpoint(layers[index], x, cos, sin, step, use_reentrant=False)
            else:
                x = layers[index](x, cos, sin, step)
        if stop in step.capture:
            boundary[stop] = x
        return x, boundary
