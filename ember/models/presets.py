"""Named model presets: tiny random models per family (tests) and real shapes with random weights (timing)."""

from __future__ import annotations

from dataclasses import replace

from ember.models.config import ModelConfig

_TINY = dict(vocab_size=104, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)

_QWEN_VOCAB = 151936

PRESETS: dict[str, ModelConfig] = {
    # Tiny, seeded, random: 2 layers, hidden 64, on the char tokenizer. One per family, with tied and
    # untied embeddings covered.
    "tiny-llama": ModelConfig(family="llama", tie_word_embeddings=False, **_TINY),
    "tiny-qwen2": ModelConfig(family="qwen2", tie_word_embeddings=True, attention_bias=True, **_TINY),
    "tiny-qwen3": ModelConfig(family="qwen3", tie_word_embeddings=True, qk_norm=True, **_TINY),
    # Real architectures' shapes with seeded random weights: for timing only; manifests say so.
    "qwen3-0.6b": ModelConfig(family="qwen3", vocab_size=_QWEN_VOCAB, hidden_size=1024, intermediate_size=3072,
                              num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                              max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True,
                              eos_token_id=151645),
    "qwen3-4b": ModelConfig(family="qwen3", vocab_size=_QWEN_VOCAB, hidden_size=2560, intermediate_size=9728,
                            num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e6,
                            max_position_embeddings=262144, tie_word_embeddings=True, qk_norm=True,
                            eos_token_id=151645),
    "qwen2.5-0.5b": ModelConfig(family="qwen2", vocab_size=_QWEN_VOCAB, hidden_size=896, intermediate_size=4864,
                                num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6,
                                max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
                                eos_token_id=151645),
}

TINY_PRESETS = tuple(name for name in PRESETS if name.startswith("tiny-"))


def preset_config(name: str, **overrides) -> ModelConfig:
    """The config of a preset, optionally with fields replaced (e.g. num_layers for a shallower model)."""
    return replace(PRESETS[name], **overrides)
