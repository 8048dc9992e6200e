"""Models: configs, the ember decoder, presets, tokenizers and `load(spec)`."""

from ember.models.config import ModelConfig
from ember.models.decoder import DecoderLM
from ember.models.loader import LoadedModel, load, random_model, resolve_dtype, save_pretrained
from ember.models.presets import PRESETS, TINY_PRESETS

__all__ = ["ModelConfig", "DecoderLM", "LoadedModel", "load", "random_model", "resolve_dtype", "save_pretrained",
           "PRESETS", "TINY_PRESETS"]
