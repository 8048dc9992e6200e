"""Settings shared by the LoRA trainers: the adapter's shape, the optimizer and each loss's knobs."""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import TrainError
from ember.models.lora import PROJECTIONS


@dataclass(frozen=True)
class TrainConfig:
    """LoRA shape, optimizer and loss knobs. `layers` None adapts every layer (UpdateLocality(N) trains
    range(N, L)). `micro_batch` sequences go through one forward/backward (gradients accumulate over them);
    `steps_per_round` optimizer steps are taken on each round's rollouts."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(PROJECTIONS)
    layers: tuple[int, ...] | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    micro_batch: int = 8
    steps_per_round: int = 1
    dpo_beta: float = 0.1  # DPO: scale of the log-ratio margin
    clip_eps: float = 0.2  # GRPO: the importance ratio is clipped to [1 - eps, 1 + eps]
    kl_beta: float = 0.0  # GRPO: weight of the KL to the base model (adapter off); 0 skips the reference pass
    min_reward: float = 0.0  # best-of-N: a prompt's best candidate is trained on only above this reward

    def __post_init__(self):
        checks = [("rank", self.rank >= 1, ">= 1"), ("micro_batch", self.micro_batch >= 1, ">= 1"),
                  ("steps_per_round", self.steps_per_round >= 1, ">= 1"), ("lr", self.lr >= 0, ">= 0"),
                  ("max_grad_norm", self.max_grad_norm > 0, "> 0"), ("clip_eps", 0 <= self.clip_eps < 1, "in [0, 1)"),
                  ("kl_beta", self.kl_beta >= 0, ">= 0"), ("dpo_beta", self.dpo_beta > 0, "> 0")]
        for name, ok, expected in checks:
            if not ok:
                raise TrainError(f"TrainConfig.{name}: expected {expected}, found {getattr(self, name)!r}")
