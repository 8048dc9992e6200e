"""A minimal in-process LoRA SFT step: next-token loss on the answer tokens of (prompt, answer) examples,
through the same decoder and weights the engine generates with (`attach`: no copy, gradients reach the adapter).

Small on purpose, so the RL trainers reuse it: `answer_nll` is the per-example loss, `SFTTrainer.step` one
AdamW step, `save` writes the adapter as a PEFT directory (atomically) so a trajectory can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ember.errors import TrainError
from ember.models.lora import PROJECTIONS, LoraAdapter, attach, kept_bindings, lora_modules


@dataclass(frozen=True)
class Example:
    """Prompt and answer token ids; the loss covers the answer tokens only."""

    prompt: list[int]
    answer: list[int]

    @classmethod
    def from_text(cls, tokenizer, prompt: str, answer: str) -> "Example":
        """Encode a rendered prompt and its answer, ending the answer with the end-of-sequence token."""
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return cls(tokenizer.encode(prompt), tokenizer.encode(answer) + eos)


@dataclass(frozen=True)
class SFTConfig:
    """LoRA shape and optimizer. `layers` None adapts every layer (UpdateLocality(N) trains range(N, L))."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(PROJECTIONS)
    layers: tuple[int, ...] | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


def batch_tensors(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids (b, T), attention mask (b, T) and answer-token mask (b, T) of a batch."""
    if not examples or any(not e.prompt or not e.answer for e in examples):
        raise TrainError("SFT batch: expected examples with a non-empty prompt and answer, found "
                         f"{[(len(e.prompt), len(e.answer)) for e in examples] or 'none'}")
    width = max(len(e.prompt) + len(e.answer) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    answer = torch.zeros_like(mask)
    for row, example in enumerate(examples):
        tokens = example.prompt + example.answer
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = True
        answer[row, width - len(example.answer):] = True
    return ids.to(device), mask.to(device), answer.to(device)


def answer_nll(model, examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of each example's answer tokens (b,) and their counts (b,), through the
    plain differentiable forward of whatever adapter is bound to `model`."""
    ids, mask, answer = batch_tensors(examples, pad_id, model.output_weight.device)
    logits = model(ids, mask)  # (b, T, V)
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (b, T-1, V): predicts tokens 1..T-1
    chosen = logprobs.gather(-1, ids[:, 1:, None])[..., 0]  # (b, T-1)
    weight = answer[:, 1:].float()
    return -(chosen * weight).sum(-1), weight.sum(-1)


class SFTTrainer:
    """One LoRA adapter trained in place on `model` with AdamW; base weights are frozen (requires_grad off).

    The adapter is created in the model's dtype (train an fp32 model for fp32 optimizer states).
    """

    def __init__(self, model, config: SFTConfig = SFTConfig(), pad_id: int = 0, adapter: LoraAdapter | None = None):
        self.model, self.config, self.pad_id = model, config, pad_id
        for param in model.parameters():
            param.requires_grad_(False)
        layers = None if config.layers is None else list(config.layers)
        self.adapter = adapter or LoraAdapter.create(model, config.rank, config.alpha, config.targets, layers,
                                                     seed=config.seed, dtype=model.output_weight.dtype)
        if not all(t.requires_grad for t in self.adapter.parameters()):
            raise TrainError("SFTTrainer: expected an adapter whose tensors require grad (LoraAdapter.create)")
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.steps = 0

    def step(self, examples: list[Example]) -> dict:
        """One optimizer step on the mean answer-token loss of `examples`: {step, loss, tokens, grad_norm}."""
        with kept_bindings(lora_modules(self.model).values()), torch.enable_grad():
            attach(self.model, self.adapter)
            nll, counts = answer_nll(self.model, examples, self.pad_id)
            loss = nll.sum() / counts.sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
        self.steps += 1
        return {"step": self.steps, "loss": loss.item(), "tokens": int(counts.sum()), "grad_norm": norm.item()}

    def save(self, path) -> Path:
        """The adapter as a PEFT directory (atomic)."""
        return self.adapter.save(path)
