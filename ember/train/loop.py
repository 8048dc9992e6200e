"""The multi-round RL loop: R rounds over a fixed prompt set, each rollouts (through a cache policy) -> rewards
-> training step(s) on the same weights -> hot swap of the new adapter -> the policy acts on the cached K/V.

Every round records the rollout's stages (prefill / decode / sampling), the policy's refresh work, the train
step, the swap and memory; a checkpoint after each round lets a run resume exactly where it stopped."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ember.engine.sampling import SamplingParams
from ember.engine.timers import synchronize
from ember.errors import TrainError
from ember.policies.probes import ProbeSpec, fresh_reference, probe
from ember.train.checkpoint import load_checkpoint, save_checkpoint
from ember.train.rollouts import groups_from


@dataclass(frozen=True)
class LoopConfig:
    """Rounds and rollout sampling. Round r samples with seed `seed + r` (candidates seeded from it).
    `probe_prompts` > 0 measures, after each update, the cached K/V's error against a fresh recompute on that
    many prompts of the set (per-layer relative L2 of K and V, KL of the next token)."""

    rounds: int = 3
    candidates: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 32
    seed: int = 0
    probe_prompts: int = 0

    def __post_init__(self):
        for name in ("rounds", "candidates", "max_tokens"):
            if getattr(self, name) < 1:
                raise TrainError(f"LoopConfig.{name}: expected >= 1, found {getattr(self, name)}")


def _memory(device) -> dict:
    """Peak device memory since the last reset (CUDA) and the process's peak resident set."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = torch.device(device).type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) if cuda else rss
    return {"peak_memory_bytes": int(peak), "rss_peak_bytes": int(rss)}


def run_round(runner, trainer, task, config: LoopConfig, round_index: int) -> dict:
    """One round: rollouts of every prompt, rewards, training, hot swap, the policy's act; the round's row."""
    engine = runner.engine
    device = engine.device
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = runner.stats.as_dict()
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                              seed=config.seed + round_index)
    result = runner.generate(list(task.prompts), config.candidates, sampling, progress=False)
    rewards = [[task.score(i, c.text) for c in out.completions] for i, out in enumerate(result.outputs)]
    groups = groups_from(result, rewards, list(task.examples))
    synchronize(device)
    began = time.perf_counter()
    metrics = trainer.train(groups)
    synchronize(device)
    train_s = time.perf_counter() - began
    began = time.perf_counter()
    update = runner.update(trainer.adapter)
    synchronize(device)
    swap_s = time.perf_counter() - began - update["refresh_s"]
    after = runner.stats.as_dict()
    flat = [r for row in rewards for r in row]
    row = {"round": round_index, "prefill_s": result.timings["prefill"], "decode_s": result.timings["decode"],
           "sampling_s": result.timings["sampling"], "refresh_s": update["refresh_s"], "train_s": train_s,
           "swap_s": swap_s, "prompt_tokens": result.prompt_tokens, "generated_tokens": result.generated_tokens,
           "train_tokens": sum(len(c.tokens) for g in groups for c in g.candidates),
           "tokens_layers_recomputed": after["tokens_layers_recomputed"] - before["tokens_layers_recomputed"],
           "tokens_layers_stale": after["tokens_layers_stale"] - before["tokens_layers_stale"],
           "hits": after["hits"] - before["hits"], "cache_bytes": after["bytes_held"],
           "reward": sum(flat) / len(flat), "reward_best": sum(max(r) for r in rewards) / len(rewards),
           "decision": update.get("decision", "none"), "exact_depth": runner.exact_depth,
           **{f"train_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}}
    row["rollout_s"] = row["prefill_s"] + row["decode_s"] + row["sampling_s"] + row["refresh_s"]
    if config.probe_prompts:
        prompts = list(task.prompts)[:config.probe_prompts]
        spec = ProbeSpec(greedy_tokens=0)
        errors = probe(engine, prompts, fresh_reference(engine, prompts, spec), spec)
        row.update({"k_rel_l2": sum(errors["k_rel_l2"]) / len(errors["k_rel_l2"]),
                    "v_rel_l2": sum(errors["v_rel_l2"]) / len(errors["v_rel_l2"]), "kl": errors["kl"]})
    row.update(_memory(device))
    return row


def run_loop(runner, trainer, task, config: LoopConfig, folder=None, should_stop: Callable[[], bool] | None = None,
             progress: bool | None = None, meta: dict | None = None) -> tuple[list[dict], bool]:
    """Rounds 0..R-1 of `task` (prompts, gold examples, score(i, text)) under `runner`'s policy, training with
    `trainer`. With `folder`, resumes from its checkpoint (of the same `meta` and config) and checkpoints each
    round; `should_stop()` is asked after each round. Returns (one row per round done, whether all are done)."""
    meta = {"config": asdict(config), "policy": runner.policy.name, "trainer": trainer.name,
            "train": asdict(trainer.config), **(meta or {})}
    rows, start = [], 0
    if folder is not None:
        restored = load_checkpoint(folder, trainer, runner, meta)
        if restored is not None:
            last, rows = restored
            start = last + 1
    bar = tqdm(range(start, config.rounds), desc=f"{trainer.name} {runner.policy.name}", leave=False,
               disable=None if progress is None else not progress)
    for round_index in bar:
        rows.append(run_round(runner, trainer, task, config, round_index))
        bar.set_postfix(reward=f"{rows[-1]['reward']:.3f}")
        if folder is not None:
            save_checkpoint(folder, round_index, trainer, runner, rows, meta)
        if should_stop is not None and round_index + 1 < config.rounds and should_stop():
            return rows, False
    return rows, True
