"""The engine: KV cache, generation, sampling and stage timers."""

from ember.engine.cache import KVCache
from ember.engine.generate import Completion, Engine, GenerationResult, RequestOutput
from ember.engine.sampling import SamplingParams
from ember.engine.stream import StreamEvent
from ember.engine.timers import StageTimer

__all__ = ["KVCache", "Completion", "Engine", "GenerationResult", "RequestOutput", "SamplingParams", "StageTimer",
           "StreamEvent"]
