"""Error probes of a cache policy against a fresh recompute with the current adapter.

`fresh_reference` computes, once per adapter, what a cache-free engine produces for the probe prompts; `probe`
compares what the engine produces through its policy-managed prefix cache (as a rollout would) against it:

* per-layer relative L2 of K and of V over all prompt tokens (cached blocks and the tail computed on them),
* KL(fresh || policy) of the next-token distribution at the last prompt token,
* agreement of `greedy_tokens` greedy tokens (fraction of positions with the same token),
* the verifier reward of `n` sampled candidates per prompt (same seeds on both paths), when a scorer is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ember.engine.sampling import SamplingParams

Scorer = Callable[[int, str], float]  # (prompt index, completion text) -> reward


@dataclass(frozen=True)
class ProbeSpec:
    """What to probe: greedy tokens compared (0: skip), sampled candidates per prompt and their sampling."""

    greedy_tokens: int = 32
    samples: int = 0
    temperature: float = 0.7
    max_tokens: int = 48
    seed: int = 0


@dataclass
class Reference:
    """A fresh recompute: per prompt K/V (L, 2, H, T, D) and last-token log-probs (V,), greedy tokens, reward."""

    kv: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    greedy: list[list[int]] | None
    reward: float | None


def _greedy(engine, prompts, spec: ProbeSpec, cached: bool) -> list[list[int]]:
    sampling = SamplingParams(temperature=0, max_tokens=spec.greedy_tokens, ignore_eos=True)
    result = engine.generate(prompts, sampling=sampling, use_prefix_cache=cached, progress=False)
    return [out.completions[0].token_ids for out in result.outputs]


def _reward(engine, prompts, spec: ProbeSpec, score: Scorer, cached: bool) -> float:
    sampling = SamplingParams(temperature=spec.temperature, max_tokens=spec.max_tokens, seed=spec.seed)
    result = engine.generate(prompts, n=spec.samples, sampling=sampling, use_prefix_cache=cached, progress=False)
    rewards = [score(i, c.text) for i, out in enumerate(result.outputs) for c in out.completions]
    return sum(rewards) / len(rewards)


def fresh_reference(engine, prompts: list, spec: ProbeSpec = ProbeSpec(), score: Scorer | None = None) -> Reference:
    """What the engine's current weights produce for `prompts` with nothing cached."""
    kv, logprobs = [], []
    for prompt in prompts:
        k, logits = engine.prefill_kv(prompt, use_prefix_cache=False)
        kv.append(k)
        logprobs.append(F.log_softmax(logits.float(), dim=-1))
    greedy = _greedy(engine, prompts, spec, cached=False) if spec.greedy_tokens else None
    reward = _reward(engine, prompts, spec, score, cached=False) if spec.samples and score is not None else None
    return Reference(kv, logprobs, greedy, reward)


def probe(engine, prompts: list, reference: Reference, spec: ProbeSpec = ProbeSpec(),
          score: Scorer | None = None, cached: bool = True) -> dict:
    """Errors of the engine's cached path against `reference` (computed for the same prompts and weights):
    {'k_rel_l2': [per layer], 'v_rel_l2': [per layer], 'kl', 'greedy_agreement', 'reward', 'reward_fresh'}."""
    layers = reference.kv[0].shape[0]
    err = torch.zeros(2, layers, dtype=torch.float64)  # (K/V, L) summed squared error
    ref = torch.zeros(2, layers, dtype=torch.float64)
    kl = 0.0
    for prompt, fresh_kv, fresh_logprobs in zip(prompts, reference.kv, reference.logprobs):
        kv, logits = engine.prefill_kv(prompt, use_prefix_cache=cached)
        diff = (kv.double() - fresh_kv.double()).square().flatten(2).sum(-1)  # (L, 2)
        err += diff.t().cpu()
        ref += fresh_kv.double().square().flatten(2).sum(-1).t().cpu()
        policy_logprobs = F.log_softmax(logits.float(), dim=-1)
        kl += float((fresh_logprobs.exp() * (fresh_logprobs - policy_logprobs)).sum())
    rel = (err / ref.clamp(min=1e-30)).sqrt()
    result = {"k_rel_l2": rel[0].tolist(), "v_rel_l2": rel[1].tolist(), "kl": kl / len(prompts),
              "greedy_agreement": None, "reward": None, "reward_fresh": reference.reward}
    if reference.greedy is not None and spec.greedy_tokens:
        tokens = _greedy(engine, prompts, spec, cached)
        same = sum(a == b for mine, theirs in zip(tokens, reference.greedy) for a, b in zip(mine, theirs))
        result["greedy_agreement"] = same / sum(len(t) for t in reference.greedy)
    if reference.reward is not None and spec.samples and score is not None:
        result["reward"] = _reward(engine, prompts, spec, score, cached)
    return result
