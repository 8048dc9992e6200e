"""GRPO: group-normalized advantages over a prompt's N candidates, the clipped importance ratio against the
log-probs the rollout sampled with (the engine's, not recomputed), and an optional KL to the base model.

The first forward of a round recomputes the rollout's log-probs with the differentiable forward: their gap to
the engine's (`logprob_gap_max`) is reported, so off-policy rollouts (stale K/V) are visible."""

from __future__ import annotations

import torch

from ember.errors import TrainError
from ember.train.lora_trainer import LoraTrainer
from ember.train.losses import group_advantages, grpo_loss


class GRPOTrainer(LoraTrainer):
    """GRPO with `config.clip_eps` and `config.kl_beta`. Groups whose rewards are all equal have zero advantage;
    they are skipped unless a KL term is on. The ratio compares the untempered policy's log-probs (the engine
    reports those, whatever temperature it sampled at)."""

    name = "grpo"

    def train(self, groups) -> dict:
        sizes = {len(g.candidates) for g in groups}
        if len(sizes) != 1:
            raise TrainError(f"GRPO: expected the same number of candidates in every group, found {sorted(sizes)}")
        rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)  # (G, N)
        advantages = group_advantages(rewards)
        rows = [(g.example(c), c.logprobs, float(a)) for g, adv in zip(groups, advantages)
                if bool(adv.any()) or self.config.kl_beta for c, a in zip(g.candidates, adv)]
        if not rows:
            return {"step": self.steps, "loss": float("nan"), "sequences": 0, "skipped": True}
        chunks = list(enumerate(self.micro_batches(rows)))
        device = self.model.output_weight.device
        reference = [self.reference_logprobs([e for e, _, _ in chunk])[0] for _, chunk in chunks] \
            if self.config.kl_beta else None  # per chunk (b, W)
        stats, gaps = [], []

        def loss_of(indexed):
            index, chunk = indexed
            new, mask = self.policy_logprobs([e for e, _, _ in chunk])  # (b, W), answers right-aligned
            old = torch.zeros_like(new)
            for row, (_, logprobs, _) in enumerate(chunk):
                old[row, new.shape[1] - len(logprobs):] = torch.tensor(logprobs, device=device)
            if first_step:
                gaps.append(float(((new.detach() - old).abs() * mask).max()))
            gain = torch.tensor([a for _, _, a in chunk], device=device, dtype=new.dtype)
            ref = reference[index] if reference is not None else None
            loss, stat = grpo_loss(new, old, gain, mask, self.config.clip_eps, ref, self.config.kl_beta)
            stats.append(stat)
            return loss.sum() / len(rows)

        for step in range(self.config.steps_per_round):
            first_step = step == 0
            stats.clear()
            metrics = self.optimize(chunks, loss_of)
        mean = {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}
        return {**metrics, "sequences": len(rows), "logprob_gap_max": max(gaps), **mean}

