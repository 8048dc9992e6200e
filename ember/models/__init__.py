"""Models: configs, the ember decoder and its step context, LoRA slots, presets, tokenizers and `load(spec)`.

Nothing here imports `ember.engine`: the engine builds steps, the decoder consumes them.
"""

from ember.models.config import ModelConfig
from ember.models.decoder import DecoderLM
from ember.models.loader import (
           LoadedModel,
           load,
           random_model,
           resolve_dtype,
           save_pretrained,
)
from ember.models.lora import LoraAdapter, attach
from ember.models.presets import PRESETS, TINY_PRESETS
from ember.models.rotary import rerotate
from ember.models.step import Step, StepOutput, causal_step
from ember.models.versions import LayerVersions

__all__ = ["ModelConfig", "DecoderLM", "LoadedModel", "load", "random_model", "resolve_dtype", "save_pretrained",
           "LoraAdapter", "attach", "PRESETS", "TINY_PRESETS", "rerotate", "Step", "StepOutput", "causal_step",
           "LayerVersions"]
