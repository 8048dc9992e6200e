"""What a round of rollouts hands the trainers: per prompt, its N candidates with the engine's token log-probs
and their verifier rewards (a group), and the prompt's gold answer for SFT."""

from __future__ import annotations

from dataclasses import dataclass

from ember.errors import TrainError
from ember.train.tokens import Example


@dataclass(frozen=True)
class Candidate:
    """One sampled completion: its tokens, the log-prob of each under the rollout weights, its reward."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    reward: float

    def __post_init__(self):
        if not self.tokens or len(self.tokens) != len(self.logprobs):
            raise TrainError(f"candidate: expected one log-prob per token (at least one token), found "
                             f"{len(self.tokens)} tokens and {len(self.logprobs)} log-probs")


@dataclass(frozen=True)
class Group:
    """A prompt's candidates (the GRPO group) and its gold answer tokens."""

    prompt: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    gold: Example

    def example(self, candidate: Candidate) -> Example:
        """The (prompt, candidate) pair as a training example."""
        return Example(list(self.prompt), list(candidate.tokens))

    @property
    def rewards(self) -> list[float]:
        return [c.reward for c in self.candidates]


def groups_from(result, rewards: list[list[float]], golds: list[Example]) -> list[Group]:
    """Groups of a GenerationResult: `rewards[i][j]` scores candidate j of prompt i."""
    if len(rewards) != len(result.outputs) or len(golds) != len(result.outputs):
        raise TrainError(f"groups: expected rewards and gold answers for {len(result.outputs)} prompts, found "
                         f"{len(rewards)} and {len(golds)}")
    groups = []
    for output, scores, gold in zip(result.outputs, rewards, golds):
        if len(scores) != len(output.completions):
            raise TrainError(f"groups: expected {len(output.completions)} rewards for a prompt, found {len(scores)}")
        candidates = tuple(Candidate(tuple(c.token_ids), tuple(c.logprobs), float(r))
                           for c, r in zip(output.completions, scores))
        groups.append(Group(tuple(output.prompt_token_ids), candidates, gold))
    return groups
