"""The "training alone" control of shared-context fusion: the receiver fine-tuned with LoRA (SFT) on the
fuser's own training examples, the same batches for the same number of steps, with no sharer at all. If a
fuser beats the receiver alone only by what this control also gains, the sharer's cache added nothing."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ember.comm.fusion import FusionExample
from ember.comm.train_fuser import FuserConfig, batch_order
from ember.errors import CommError
from ember.tasks.evaluate import render
from ember.train import TrainConfig
from ember.train.sft import SFTTrainer
from ember.train.tokens import Example

LORA_NAME = "lora-control"


def train_lora_control(engine, examples: list[FusionExample], config: FuserConfig, rank: int = 16,
                       lr: float = 1e-4, progress: bool | None = None) -> tuple[SFTTrainer, list[dict], float]:
    """An SFT LoRA adapter on the receiver trained on `examples` with the fuser run's batches; returns the
    trainer (its `.adapter`), the per-step history and the training seconds."""
    if not examples or any(not ex.answer for ex in examples):
        raise CommError("train_lora_control: expected examples that all have answers")
    data = [Example.from_text(engine.tokenizer, render(engine.tokenizer, list(ex.messages)), ex.answer)
            for ex in examples]
    trainer = SFTTrainer(engine.model, TrainConfig(rank=rank, alpha=2.0 * rank, lr=lr, seed=config.seed,
                                                   micro_batch=config.batch), pad_id=engine.tokenizer.pad_token_id or 0)
    history, began = [], time.perf_counter()
    for step in tqdm(range(config.steps), desc="lora control", disable=None if progress is None else not progress):
        metrics = trainer.step([data[i] for i in batch_order(len(data), config, step)])
        history.append({"step": step + 1, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"]})
    return trainer, history, time.perf_counter() - began
