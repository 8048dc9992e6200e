"""The RL losses on token log-probs, batched (the tests hold them against per-token loops).

Shapes: b sequences, T answer-token positions (`mask` (b, T) is 1 on real tokens, wherever they sit)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: the ratio stays finite in float32 however off-policy a rollout was


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages (G, N) of rewards (G, N): each group's rewards minus their mean over the standard
    deviation (population, plus eps); a group whose rewards are all equal gets exact zeros."""
    centered = rewards - rewards.mean(dim=-1, keepdim=True)
    spread = (rewards.amax(dim=-1, keepdim=True) - rewards.amin(dim=-1, keepdim=True)) > 1e-12
    return torch.where(spread, centered / (rewards.std(dim=-1, unbiased=False, keepdim=True) + eps), 0.0)


def grpo_loss(new: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float, ref: torch.Tensor | None = None, kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Per-sequence GRPO loss (b,): the mean over its tokens of -min(rho A, clip(rho, 1-eps, 1+eps) A) plus
    kl_beta x KL(new || ref) by the k3 estimator exp(ref - new) - (ref - new) - 1, where rho = exp(new - old)
    (new - old capped at MAX_LOG_RATIO).

    new (b, T) are the current policy's log-probs (differentiable), old (b, T) those the rollout sampled with,
    ref (b, T) the reference model's; advantages (b,). Also returns the mean ratio, clipped fraction and KL."""
    ratio = torch.exp((new - old).clamp(max=MAX_LOG_RATIO))  # (b, T); bounded: stale rollouts can be far off
    seen = ratio.detach()
    gain = advantages[:, None]
    surrogate = torch.minimum(ratio * gain, ratio.clamp(1 - clip_eps, 1 + clip_eps) * gain)  # (b, T)
    per_token = -surrogate
    kl = torch.zeros_like(new)
    if ref is not None and kl_beta:
        delta = ref - new
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_beta * kl
    counts = mask.sum(-1).clamp(min=1)
    loss = (per_token * mask).sum(-1) / counts  # (b,)
    clipped = ((seen - 1).abs() > clip_eps).float()
    stats = {"ratio": float((seen * mask).sum() / mask.sum()), "clipped": float((clipped * mask).sum() / mask.sum()),
             "kl": float((kl.detach() * mask).sum() / mask.sum())}
    return loss, stats


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair DPO loss (b,): -log sigmoid(beta x ((chosen - ref_chosen) - (rejected - ref_rejected))) on
    summed sequence log-probs (b,) of the policy and the reference."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))
