"""LoRA trainers that run in-process on the engine's own decoder and weights."""

from ember.train.sft import Example, SFTConfig, SFTTrainer, answer_nll

__all__ = ["Example", "SFTConfig", "SFTTrainer", "answer_nll"]
