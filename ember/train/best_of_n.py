"""Best-of-N: fine-tune on each prompt's best-scoring candidate (rejection sampling), the SFT loss on it."""

from __future__ import annotations

from ember.train.sft import SFTTrainer


def best_candidates(groups, min_reward: float) -> list:
    """Per group its first highest-reward candidate as an example, for groups whose best reward > min_reward."""
    chosen = []
    for group in groups:
        best = max(group.candidates, key=lambda c: c.reward)  # max keeps the first of ties
        if best.reward > min_reward:
            chosen.append(group.example(best))
    return chosen


class BestOfNTrainer(SFTTrainer):
    """SFT on the best candidate of every prompt whose best reward beats `config.min_reward`."""

    name = "best_of_n"

    def train(self, groups) -> dict:
        """`steps_per_round` SFT steps on the round's best candidates (none above the bar: no step)."""
        examples = best_candidates(groups, self.config.min_reward)
        if not examples:
            return {"step": self.steps, "loss": float("nan"), "sequences": 0, "skipped": True}
        for _ in range(self.config.steps_per_round):
            metrics = self.step(examples)
        return {**metrics, "sequences": len(examples)}
