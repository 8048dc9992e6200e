"""Decoder configuration: one frozen dataclass, read from and written to Hugging Face `config.json` dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ember.errors import ModelLoadError, UnsupportedModelError

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
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; refuse what the decoder would compute wrongly. Every error
        names `source` (the file) and the field: missing, of the wrong type, or out of range."""
        if not isinstance(hf, dict):
            raise ModelLoadError(f"{source}: expected a JSON object, found {type(hf).__name__}")
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise UnsupportedModelError(f"{source}: model_type: expected one of {FAMILIES}, found {family!r}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act: expected 'silu', found {act!r}")
        if _read(hf, source, "mlp_bias", bool, False):
            raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported by the ember decoder")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ModelLoadError(f"{source}: rope_parameters / rope_scaling: expected an object, found {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"{source}: rope type: expected 'default', found {rope_type!r}")
        rope_theta = _read(hf, source, "rope_theta", float, _read(rope, source, "rope_theta", float, 10000.0))
        if family == "qwen2" and _read(hf, source, "use_sliding_window", bool, False):
            raise UnsupportedModelError(f"{source}: qwen2 use_sliding_window=true is not supported by the ember "
                                        "decoder")
        heads = _read(hf, source, "num_attention_heads", int)
        hidden = _read(hf, source, "hidden_size", int)
        values = dict(
            family=family,
            vocab_size=_read(hf, source, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=_read(hf, source, "intermediate_size", int),
            num_layers=_read(hf, source, "num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=_read(hf, source, "num_key_value_heads", int, heads),
            head_dim=_read(hf, source, "head_dim", int, hidden // heads),
            rms_norm_eps=_read(hf, source, "rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta,
            max_position_embeddings=_read(hf, source, "max_position_embeddings", int, 32768),
            tie_word_embeddings=_read(hf, source, "tie_word_embeddings", bool, False),
            attention_bias=True if family == "qwen2" else _read(hf, source, "attention_bias", bool, False),
            qk_norm=family == "qwen3",
            bos_token_id=_token_id(hf, source, "bos_token_id"),
            eos_token_id=_token_id(hf, source, "eos_token_id"),
            pad_token_id=_token_id(hf, source, "pad_token_id"),
        )
        try:
            return cls(**values)
        except UnsupportedModelError as error:  # shapes the decoder cannot split into heads
            raise UnsupportedModelError(f"{source}: {error}") from None

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


_REQUIRED = object()
_KINDS = {int: "a positive integer", float: "a positive number", bool: "true or false"}


def _read(hf: dict, source: str, key: str, kind: type, default=_REQUIRED):
    """`hf[key]` as `kind` (int and float values must be positive), or `default` when absent or null."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"{source}: {key}: expected {_KINDS[kind]}, found no such field")
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = isinstance(value, bool) if kind is bool else (number and value > 0 and (kind is float or type(value) is int))
    if not ok:
        raise ModelLoadError(f"{source}: {key}: expected {_KINDS[kind]}, found {value!r}")
    return float(value) if kind is float else value


def _token_id(hf: dict, source: str, key: str) -> int | None:
    """A special token id; HF configs may store several (eos) as a list, of which the decoder keeps the first."""
    value = hf.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is not None and (type(value) is not int or value < 0):
        raise ModelLoadError(f"{source}: {key}: expected a non-negative integer (or a list of them), found "
                             f"{hf[key]!r}")
    return value
