"""DPO on rollout pairs: per prompt its best against its worst candidate (by verifier reward), the reference
model being the base with the adapter off."""

from __future__ import annotations

import torch

from ember.train.lora_trainer import LoraTrainer
from ember.train.losses import dpo_loss


def preference_pairs(groups) -> list[tuple]:
    """(chosen, rejected) examples: each group's first highest- and first lowest-reward candidates, for groups
    whose rewards are not all equal."""
    pairs = []
    for group in groups:
        best = max(group.candidates, key=lambda c: c.reward)
        worst = min(group.candidates, key=lambda c: c.reward)
        if best.reward > worst.reward:
            pairs.append((group.example(best), group.example(worst)))
    return pairs


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed answer-token log-probs (b,) of (b, W) log-probs and their answer mask."""
    return (logprobs * mask).sum(-1)


class DPOTrainer(LoraTrainer):
    """DPO with `config.dpo_beta` on the round's preference pairs (no pair: no step)."""

    name = "dpo"

    def train(self, groups) -> dict:
        pairs = preference_pairs(groups)
        if not pairs:
            return {"step": self.steps, "loss": float("nan"), "sequences": 0, "skipped": True}
        chunks = list(enumerate(self.micro_batches(pairs)))
        reference = [sequence_logprobs(*self.reference_logprobs([p[0] for p in c] + [p[1] for p in c]))
                     for _, c in chunks]  # per chunk (2 x pairs,): chosen then rejected
        margins = []

        def loss_of(indexed):
            index, chunk = indexed
            policy = sequence_logprobs(*self.policy_logprobs([p[0] for p in chunk] + [p[1] for p in chunk]))
            half, ref = len(chunk), reference[index]
            margin = (policy[:half] - ref[:half]) - (policy[half:] - ref[half:])  # (pairs,)
            margins.extend(margin.tolist())
            losses = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], self.config.dpo_beta)  # (pairs,)
            return losses.sum() / len(pairs)

        for _ in range(self.config.steps_per_round):
            margins.clear()
            metrics = self.optimize(chunks, loss_of)
        return {**metrics, "sequences": 2 * len(pairs), "pairs": len(pairs), "margin": sum(margins) / len(margins)}
