"""LoRA trainers that run in-process on the engine's own decoder and weights: SFT, best-of-N, DPO, GRPO."""

from ember.errors import TrainError
from ember.train.best_of_n import BestOfNTrainer
from ember.train.config import TrainConfig
from ember.train.dpo import DPOTrainer
from ember.train.grpo import GRPOTrainer
from ember.train.sft import SFTTrainer
from ember.train.tokens import Example, answer_nll

TRAINERS = {t.name: t for t in (SFTTrainer, BestOfNTrainer, DPOTrainer, GRPOTrainer)}


def make_trainer(name: str, model, config: TrainConfig, pad_id: int = 0):
    """A trainer by name ('sft', 'best_of_n', 'dpo', 'grpo') on `model`."""
    if name not in TRAINERS:
        raise TrainError(f"trainer: expected one of {sorted(TRAINERS)}, found {name!r}")
    return TRAINERS[name](model, config, pad_id)


__all__ = ["TRAINERS", "BestOfNTrainer", "DPOTrainer", "Example", "GRPOTrainer", "SFTTrainer", "TrainConfig",
           "answer_nll", "make_trainer"]
