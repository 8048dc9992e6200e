"""The part every LoRA trainer shares: one adapter trained in place on the engine's own decoder (base weights
frozen), AdamW, gradient accumulation over micro-batches, token log-probs through the differentiable forward
(with the adapter, or with it off for the reference model), and the state a checkpoint needs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from ember.errors import TrainError
from ember.models.lora import LoraAdapter, attach, clear_bindings, kept_bindings, lora_modules
from ember.train.config import TrainConfig
from ember.train.tokens import Example, token_logprobs


class LoraTrainer:
    """An adapter on `model` (created from `config`, or given) and its AdamW optimizer.

    Subclasses implement `train(groups) -> metrics`, built on `optimize`. The adapter is created in the model's
    dtype (train an fp32 model for fp32 optimizer states).
    """

    name = "lora"

    def __init__(self, model, config: TrainConfig = TrainConfig(), pad_id: int = 0,
                 adapter: LoraAdapter | None = None):
        self.model, self.config, self.pad_id = model, config, pad_id
        for param in model.parameters():
            param.requires_grad_(False)
        layers = None if config.layers is None else list(config.layers)
        self.adapter = adapter or LoraAdapter.create(model, config.rank, config.alpha, config.targets, layers,
                                                     seed=config.seed, dtype=model.output_weight.dtype)
        if not all(t.requires_grad for t in self.adapter.parameters()):
            raise TrainError(f"{type(self).__name__}: expected an adapter whose tensors require grad "
                             f"(LoraAdapter.create)")
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.steps = 0

    def train(self, groups) -> dict:
        """One round of training on the rollout groups of a round; returns metrics."""
        raise NotImplementedError

    def micro_batches(self, items: Sequence) -> list[Sequence]:
        """`items` in consecutive chunks of `config.micro_batch`."""
        size = self.config.micro_batch
        return [items[i:i + size] for i in range(0, len(items), size)]

    def optimize(self, chunks: Sequence, loss_of: Callable[[Sequence], torch.Tensor]) -> dict:
        """One optimizer step: `loss_of(chunk)` is each micro-batch's share of the loss (the shares sum to the
        loss), back-propagated one chunk at a time with the adapter attached. Returns {step, loss, grad_norm}."""
        if not chunks:
            raise TrainError(f"{type(self).__name__}: expected at least one micro-batch to train on, found none")
        total = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        with kept_bindings(lora_modules(self.model).values()), torch.enable_grad():
            attach(self.model, self.adapter)
            for chunk in chunks:
                loss = loss_of(chunk)
                if not math.isfinite(loss.item()):
                    raise TrainError(f"{type(self).__name__}: expected a finite loss, found {loss.item()} (the "
                                     f"adapter is left as it was)")
                loss.backward()
                total += loss.item()
            norm = torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), self.config.max_grad_norm)
            if not torch.isfinite(norm):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainError(f"{type(self).__name__}: expected finite gradients, found a norm of {norm.item()} "
                                 f"(no step taken; the adapter is left as it was)")
            self.optimizer.step()
        self.steps += 1
        return {"step": self.steps, "loss": total, "grad_norm": norm.item()}

    def policy_logprobs(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-token log-probs (b, W) under the adapter, differentiable, and the answer mask (b, W)
        (call inside `optimize`, where the adapter is attached)."""
        return token_logprobs(self.model, examples, self.pad_id)

    @torch.no_grad()
    def reference_logprobs(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-token log-probs (b, W) of the reference model, the base with the adapter off, and the mask."""
        modules = lora_modules(self.model).values()
        with kept_bindings(modules):
            clear_bindings(modules)
            return token_logprobs(self.model, examples, self.pad_id)

    def state_dict(self) -> dict:
        """Optimizer state and step count (the adapter is saved on its own, as a PEFT directory)."""
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def restore(self, adapter: LoraAdapter, state: dict) -> None:
        """Continue from a checkpoint: train `adapter` (loaded from it) with the optimizer state `state_dict()`."""
        if set(adapter.weights) != set(self.adapter.weights):
            raise TrainError(f"{type(self).__name__}.restore: expected an adapter of the modules this trainer "
                             f"trains ({len(self.adapter.weights)}), found {len(adapter.weights)} other or missing")
        adapter.weights = {name: adapter.weights[name] for name in self.adapter.weights}  # the optimizer's order
        for tensor in adapter.parameters():
            tensor.requires_grad_(True)
        self.adapter = adapter
        self.optimizer = torch.optim.AdamW(adapter.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = state["steps"]

    def save(self, path) -> Path:
        """The adapter as a PEFT directory (atomic)."""
        return self.adapter.save(path)
