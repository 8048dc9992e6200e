"""Token-level data of the trainers: (prompt, answer) examples, their padded batch, and the answer tokens'
log-probs through the plain differentiable forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.errors import TrainError
from ember.models.step import causal_step


@dataclass(frozen=True)
class Example:
    """Prompt and answer token ids; losses cover the answer tokens only."""

    prompt: list[int]
    answer: list[int]

    @classmethod
    def from_text(cls, tokenizer, prompt: str, answer: str) -> "Example":
        """Encode a rendered prompt and its answer, ending the answer with the end-of-sequence token."""
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return cls(tokenizer.encode(prompt), tokenizer.encode(answer) + eos)


def batch_tensors(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids (b, T), attention mask (b, T) and answer-token mask (b, T) of a batch."""
    if not examples or any(not e.prompt or not e.answer for e in examples):
        raise TrainError("training batch: expected examples with a non-empty prompt and answer, found "
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


def token_logprobs(model, examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (b, W) of the last W tokens of each row, W the longest answer, through the forward of whatever
    adapter is bound to `model`, and the mask (b, W) of the answer tokens among them (right-aligned: row i's
    answer is its last `len(answer)` columns). Logits are computed at those W positions only."""
    ids, mask, answer = batch_tensors(examples, pad_id, model.output_weight.device)
    width = int(answer.sum(-1).max())
    step = causal_step(tuple(ids.shape), mask, device=ids.device, logits="none")
    hidden = model.run(step, input_ids=ids).hidden[:, -width - 1:-1]  # (b, W, hidden): predict the last W tokens
    logits = F.linear(model.model.norm(hidden), model.output_weight)  # (b, W, V)
    logprobs = F.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, ids[:, -width:, None])[..., 0]  # (b, W)
    return chosen, answer[:, -width:].float()


def answer_nll(model, examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of each example's answer tokens (b,) and their counts (b,)."""
    chosen, weight = token_logprobs(model, examples, pad_id)
    return -(chosen * weight).sum(-1), weight.sum(-1)

