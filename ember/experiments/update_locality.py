"""fig4: update locality. For each frozen depth N (a fraction of the layers), an adapter trained only on layers
>= N for the same number of SFT steps on the extraction task; its trajectory replayed round by round (rollouts of
`candidates` per prompt over a fixed prompt set, then the next update) under UpdateLocality(N), PrefixOnly and
Naive: prefill tokens x layers and seconds per round, the rollout reward and the held-out accuracy the adapter
reaches. The replay engines decode
without CUDA graphs (each would capture its own; prefill is what is compared)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ember.engine import Engine, SamplingParams
from ember.experiments.cells import CellStore
from ember.errors import ParamsError
from ember.experiments.workloads import check_lora_targets, extraction_set, resolve_device
from ember.models.lora import PROJECTIONS
from ember.params import RunParams, param
from ember.policies import Naive, PolicyRunner, PrefixOnly, UpdateLocality
from ember.report import macro_name, report_dir
from ember.tasks.evaluate import evaluate
from ember.tasks.extraction import verify
from ember.train import TrainConfig
from ember.train.trajectory import losses as trajectory_losses
from ember.train.trajectory import trajectory


@dataclass(frozen=True)
class Params(RunParams):
    """Frozen depths, the round structure and the LoRA/SFT setup of fig4."""

    frozen_fractions: tuple[float, ...] = param((0.0, 0.5, 1.0), low=0.0, high=1.0)
    rounds: int = param(2, low=1)  # updates; round 0 runs on the base model
    prompts: int = param(3, low=1)
    candidates: int = param(2, low=1)
    max_tokens: int = param(8, low=1)
    temperature: float = param(0.7, low=0.0)
    eval_items: int = param(3, low=1)
    eval_max_tokens: int = param(48, low=1)
    rank: int = param(4, low=1)
    alpha: float = param(8.0, low=0.0)
    lr: float = param(1e-3, low=0.0)
    sft_batch: int = param(3, low=1)
    targets: tuple[str, ...] = tuple(PROJECTIONS)
    block_size: int = param(16, low=1)
    accuracy_tolerance: float = param(0.05, low=0.0)  # held-out accuracy lost vs training every layer that is fine
    time_budget_s: float = param(0.0, low=0.0)  # > 0: stop after this many seconds; finished cells resume next run

    def validate(self) -> None:
        super().validate()
        check_lora_targets(self)
        if 0.0 not in self.frozen_fractions:
            raise ParamsError(f"{type(self).__name__}.frozen_fractions: expected 0.0 among them (training every "
                              f"layer is the reference), found {list(self.frozen_fractions)}")


def frozen_depth(fraction: float, num_layers: int) -> int:
    """N for a fraction of the layers (rounded to the nearest layer)."""
    return int(round(fraction * num_layers))


def _replay(engine_for, policy_of, adapters, workload, params, repeat: int) -> list[dict]:
    """Rounds 0..R under each policy on its own engine, interleaved (the order reverses every round)."""
    runners = {name: PolicyRunner(engine_for(), make(), params.block_size) for name, make in policy_of.items()}
    sampling = SamplingParams(temperature=params.temperature, max_tokens=params.max_tokens, seed=params.seed)
    rows = []
    for round_index in range(params.rounds + 1):
        names = list(runners) if (round_index + repeat) % 2 == 0 else list(runners)[::-1]
        for name in names:
            runner = runners[name]
            before = runner.stats.as_dict()
            refresh = runner.update(adapters[round_index - 1])["refresh_s"] if round_index and adapters else 0.0
            result = runner.generate(list(workload.prompts), params.candidates, sampling)
            after = runner.stats.as_dict()
            rewards = [workload.score(i, c.text) for i, out in enumerate(result.outputs) for c in out.completions]
            rows.append({"policy": name, "repeat": repeat, "round": round_index,
                         "prefill_s": after["prefill_s"] - before["prefill_s"], "refresh_s": refresh,
                         "tokens_layers_recomputed": after["tokens_layers_recomputed"] - before["tokens_layers_recomputed"],
                         "hits": after["hits"] - before["hits"], "misses": after["misses"] - before["misses"],
                         "bytes_held": after["bytes_held"], "reward": sum(rewards) / len(rewards),
                         "tokens": [c.token_ids for out in result.outputs for c in out.completions]})
    return rows


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """One cell per frozen fraction (stored as it finishes, so a run resumes); rows per (N, policy, repeat, round)."""
    device = resolve_device(params.device)
    engine = Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed, progress=False)
    workload = extraction_set(engine.tokenizer, params.prompts, params.seed)
    held_out = extraction_set(engine.tokenizer, params.eval_items, params.seed + 10_000)
    cells = {f"frozen={fraction}": (lambda fraction=fraction: _cell(engine, workload, held_out, params, fraction))
             for fraction in params.frozen_fractions}
    df = CellStore(params, params.time_budget_s).run(cells, progress)
    return df, engine.provenance


def _cell(engine, workload, held_out, params: Params, fraction: float) -> pd.DataFrame:
    model, tokenizer = engine.model, engine.tokenizer
    layers = model.config.num_layers
    frozen = frozen_depth(fraction, layers)
    adapters, losses = [], []
    if frozen < layers:
        config = TrainConfig(rank=params.rank, alpha=params.alpha, targets=params.targets,
                           layers=tuple(range(frozen, layers)), lr=params.lr, seed=params.seed)
        folder = report_dir(params.target) / "trajectories" / f"{params.profile}-frozen{frozen}"
        adapters = trajectory(model, config, list(workload.examples), params.rounds, params.sft_batch, folder,
                              engine._pad_id)
        losses = trajectory_losses(folder)
    engine_for = lambda: Engine(model, tokenizer, progress=False, cuda_graphs=False)  # noqa: E731  each policy its own engine
    policies = {"UpdateLocality": lambda: UpdateLocality(frozen), "PrefixOnly": PrefixOnly, "Naive": Naive}
    rows = []
    for repeat in range(params.warmup + params.repeats):
        replay = _replay(engine_for, policies, adapters, workload, params, repeat)
        if repeat >= params.warmup:
            rows.extend(dict(r, repeat=repeat - params.warmup) for r in replay)
    final = Engine(model, tokenizer, progress=False, prefix_cache=False, cuda_graphs=False)
    if adapters:
        final.set_adapter(final.load_adapter(adapters[-1]))
    quality = evaluate(final, held_out.items, lambda item, text: verify(item, text)["reward"] == 1.0,
                       max_tokens=params.eval_max_tokens)
    df = pd.DataFrame(rows)
    # UpdateLocality is exact: its rollouts must be Naive's, token for token (same seeds, same adapter)
    by_policy = df.set_index(["repeat", "round", "policy"])["tokens"].unstack("policy")
    df["same_tokens_as_naive"] = df.apply(lambda r: by_policy.loc[(r["repeat"], r["round"]), "Naive"] == r["tokens"],
                                          axis=1)
    df = df.drop(columns="tokens")
    df.insert(0, "frozen_layers", frozen)
    df.insert(0, "frozen_fraction", fraction)
    df["num_layers"] = layers
    df["eval_accuracy"] = quality["accuracy"]
    df["final_sft_loss"] = losses[-1] if losses else float("nan")
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per (frozen fraction, policy): median over repeats of the prefill seconds and tokens x layers summed over
    the rounds after updates, the last round's rollout reward (on the prompt set revisited every round, what RL
    optimizes) and the held-out accuracy; the saving vs Naive and vs PrefixOnly; the reward change vs training
    every layer (frozen fraction 0)."""
    after = df[df["round"] > 0]
    per_repeat = after.groupby(["frozen_fraction", "frozen_layers", "policy", "repeat"], as_index=False).agg(
        prefill_s=("prefill_s", "sum"), tokens_layers=("tokens_layers_recomputed", "sum"))
    summary = per_repeat.groupby(["frozen_fraction", "frozen_layers", "policy"], as_index=False)[
        ["prefill_s", "tokens_layers"]].median()
    last = df[df["round"] == df["round"].max()].groupby(["frozen_fraction", "policy"], as_index=False).agg(
        reward=("reward", "mean"), eval_accuracy=("eval_accuracy", "first"),
        exact=("same_tokens_as_naive", "all"))
    summary = summary.merge(last, on=["frozen_fraction", "policy"])
    for baseline in ("Naive", "PrefixOnly"):  # PrefixOnly shares prefixes too: the saving due to locality alone
        base = summary[summary["policy"] == baseline].set_index("frozen_fraction")
        suffix = "" if baseline == "Naive" else "_vs_prefix_only"
        for column, saved in (("prefill_s", "prefill_saved_pct"), ("tokens_layers", "tokens_layers_saved_pct")):
            reference = summary["frozen_fraction"].map(base[column]) if len(base) else float("nan")
            summary[saved + suffix] = 100 * (1 - summary[column] / reference)
    summary["frozen_pct"] = 100 * summary["frozen_fraction"]
    full = summary[(summary["policy"] == "Naive") & (summary["frozen_fraction"] == 0.0)]
    summary["reward_change"] = summary["reward"] - full["reward"].iloc[0]  # vs training every layer
    summary["accuracy_change"] = summary["eval_accuracy"] - full["eval_accuracy"].iloc[0]
    return summary


def recommendation(summary: pd.DataFrame, tolerance: float) -> dict:
    """The frozen depths (% of layers) whose held-out accuracy stays within `tolerance` of training every layer
    (greedy answers to items never trained on, so it measures what the adapter learned, not what it memorized):
    the recommended range is the contiguous run from the shallowest N; the failure boundary is the first N beyond
    it (None if every N holds up)."""
    ul = summary[summary["policy"] == "UpdateLocality"].sort_values("frozen_pct")
    fine = []
    for row in ul.itertuples():
        if row.accuracy_change < -tolerance:
            return {"recommended_low_pct": fine[0] if fine else None, "recommended_high_pct": fine[-1] if fine else None,
                    "failure_pct": row.frozen_pct}
        fine.append(row.frozen_pct)
    return {"recommended_low_pct": fine[0], "recommended_high_pct": fine[-1], "failure_pct": None}


def macros(summary: pd.DataFrame, tolerance: float, target: str = "fig4") -> dict:
    """Per frozen depth: prefill and tokens x layers saved (%) vs Naive and vs PrefixOnly, rollout reward and
    held-out accuracy change vs training every layer; the recommended range and the failure boundary (% of
    layers; "none" where nothing fails)."""
    values = {}
    for row in summary[summary["policy"] == "UpdateLocality"].itertuples():
        cell = ("frozen", int(round(row.frozen_pct)))
        values[macro_name(target, "prefill saved", *cell)] = row.prefill_saved_pct
        values[macro_name(target, "work saved", *cell)] = row.tokens_layers_saved_pct
        values[macro_name(target, "reward change", *cell)] = row.reward_change
        values[macro_name(target, "accuracy change", *cell)] = 100 * row.accuracy_change
        if not pd.isna(getattr(row, "prefill_saved_pct_vs_prefix_only", float("nan"))):
            values[macro_name(target, "prefill saved vs prefix only", *cell)] = row.prefill_saved_pct_vs_prefix_only
    for key, value in recommendation(summary, tolerance).items():
        values[macro_name(target, key.replace("_pct", ""))] = "none" if value is None else float(value)
    return values
