"""Decoder configuration: one frozen dataclass, read from and written to Hugging Face `config.json` dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ember.errors import UnsupportedModelError

FAMILIES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a llama-style decoder (llama / qwen2 / qwen3 families)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (qwen2)
    qk_norm: bool = False  # RMSNorm on per-head q and k (qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"model family: expected one of {FAMILIES}, found {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token across all layers at 2 bytes per element (fp16/bf16)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; refuse what the decoder would compute wrongly."""
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise UnsupportedModelError(
                f"config.json model_type: expected one of {FAMILIES}, found {family!r}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act: expected 'silu', found {act!r}")
        if hf.get("mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=true is not supported by the ember decoder")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"rope type: expected 'default', found {rope_type!r}")
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        if family == "qwen2" and hf.get("use_sliding_window", False):
            raise UnsupportedModelError("qwen2 use_sliding_window=true is not supported by the ember decoder")
        heads = hf["num_attention_heads"]
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=True if family == "qwen2" else hf.get("attention_bias", False),
            qk_norm=family == "qwen3",
            bos_token_id=_first(hf.get("bos_token_id")),
            eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=_first(hf.get("pad_token_id")),
        )

    def to_hf(self) -> dict:
        """A `config.json` dict that transformers loads into the matching architecture."""
        hf = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "qwen2":
            hf["use_sliding_window"] = False
        return hf

    def as_dict(self) -> dict:
        return asdict(self)


def _first(value):
    """HF configs may store several eos ids as a list; the decoder config keeps the first."""
    if isinstance(value, list):
        return value[0] if value else None
    return value
