"""SFT on gold answers: next-token loss on the answer tokens of (prompt, answer) examples, through the same
decoder and weights the engine generates with (`attach`: no copy, gradients reach the adapter)."""

from __future__ import annotations

from ember.train.lora_trainer import LoraTrainer
from ember.train.tokens import Example, answer_nll


class SFTTrainer(LoraTrainer):
    """Supervised LoRA fine-tuning; in the RL loop it trains on each prompt's gold answer."""

    name = "sft"

    def step(self, examples: list[Example]) -> dict:
        """One optimizer step on the mean answer-token loss of `examples`: {step, loss, tokens, grad_norm}."""
        tokens = sum(len(e.answer) for e in examples)

        def loss_of(chunk):
            nll, _ = answer_nll(self.model, list(chunk), self.pad_id)
            return nll.sum() / tokens

        return {**self.optimize(self.micro_batches(examples), loss_of), "tokens": tokens}

    def train(self, groups) -> dict:
        """`steps_per_round` steps on the gold answers of the round's prompts."""
        examples = [g.gold for g in groups]
        for _ in range(self.config.steps_per_round):
            metrics = self.step(examples)
        return {**metrics, "sequences": len(examples)}
