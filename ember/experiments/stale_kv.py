"""fig5: stale and corrected K/V. For each LoRA rank r, one real SFT trajectory of `updates` steps on the
extraction task, replayed under KeepStale, PeriodicRefresh(k) and UpdatableKV(k) for each k. After every update,
the error of what the next rollout would attend to, against a fresh recompute with the current adapter: per-layer
relative L2 of K and V, next-token KL at the last prompt token, and (at quality points) greedy-token agreement
and the verifier reward of sampled candidates. The replay engines decode without CUDA graphs (each would capture
its own, for a few probe tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from ember.engine import Engine, SamplingParams
from ember.experiments.cells import CellStore
from ember.experiments.workloads import check_lora_targets, extraction_set, resolve_device
from ember.models.lora import PROJECTIONS
from ember.params import RunParams, param
from ember.policies import KeepStale, PeriodicRefresh, PolicyRunner, UpdatableKV
from ember.policies.probes import ProbeSpec, fresh_reference, probe
from ember.report import Fixed, macro_name, report_dir
from ember.train import TrainConfig
from ember.train.trajectory import trajectory


@dataclass(frozen=True)
class Params(RunParams):
    """The rank x refresh-period grid, the trajectory and the probes of fig5."""

    ranks: tuple[int, ...] = param((4,), low=1)
    periods: tuple[int, ...] = param((1, 2), low=1)
    updates: int = param(3, low=1)
    prompts: int = param(2, low=1)
    lr: float = param(1e-3, low=0.0)
    alpha_per_rank: float = param(2.0, low=0.0)  # lora_alpha = alpha_per_rank x r
    sft_batch: int = param(2, low=1)
    targets: tuple[str, ...] = tuple(PROJECTIONS)
    block_size: int = param(16, low=1)
    greedy_tokens: int = param(8, low=0)
    samples: int = param(2, low=0)  # sampled candidates per prompt for the reward probe
    sample_max_tokens: int = param(16, low=1)
    temperature: float = param(0.7, low=0.0)
    quality_every: int = param(0, low=0)  # greedy/reward probes every this many updates (0: after the last only)
    time_budget_s: float = param(0.0, low=0.0)  # > 0: stop after this many seconds; finished cells resume next run

    def validate(self) -> None:
        super().validate()
        check_lora_targets(self)


def policies(params: Params) -> list[tuple[str, int | None, object]]:
    """(family, k, make) of every replay: KeepStale once, PeriodicRefresh(k) and UpdatableKV(k) per k."""
    replays = [("KeepStale", None, KeepStale)]
    for k in params.periods:
        replays += [("PeriodicRefresh", k, lambda k=k: PeriodicRefresh(k)), ("UpdatableKV", k, lambda k=k: UpdatableKV(k))]
    return replays


def _quality_point(update: int, params: Params) -> bool:
    return update == params.updates or (params.quality_every > 0 and update % params.quality_every == 0)


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """One cell per rank (stored as it finishes); rows per (rank, policy, k, update, layer)."""
    device = resolve_device(params.device)
    engine = Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed, progress=False)
    workload = extraction_set(engine.tokenizer, params.prompts, params.seed)
    cells = {f"rank={rank}": (lambda rank=rank: _cell(engine, workload, params, rank, progress))
             for rank in params.ranks}
    df = CellStore(params, params.time_budget_s).run(cells, progress)
    return df, engine.provenance


def _cell(engine, workload, params: Params, rank: int, progress) -> pd.DataFrame:
    model, tokenizer = engine.model, engine.tokenizer
    config = TrainConfig(rank=rank, alpha=params.alpha_per_rank * rank, targets=params.targets, lr=params.lr,
                       seed=params.seed)
    folder = report_dir(params.target) / "trajectories" / f"{params.profile}-r{rank}"
    adapters = trajectory(model, config, list(workload.examples), params.updates, params.sft_batch, folder,
                          engine._pad_id)
    prompts = list(workload.prompts)
    fresh = Engine(model, tokenizer, progress=False, prefix_cache=False, cuda_graphs=False)
    references = []
    for update, adapter in enumerate(adapters, start=1):
        fresh.set_adapter(fresh.load_adapter(adapter, "current"))
        spec = _spec(params, _quality_point(update, params))
        references.append((spec, fresh_reference(fresh, prompts, spec, workload.score)))
    rows = []
    fill = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    replays = policies(params)
    for family, k, make in tqdm(replays, desc=f"r={rank}", disable=None if progress is None else not progress,
                                leave=False):
        runner = PolicyRunner(Engine(model, tokenizer, progress=False, cuda_graphs=False), make(), params.block_size)
        runner.generate(prompts, 1, fill)  # round 0: the cache filled under the base model
        since = 0
        for update, (adapter, (spec, reference)) in enumerate(zip(adapters, references), start=1):
            done = runner.update(adapter)
            since = 0 if done["decision"] == "drop" else since + 1
            errors = probe(runner.engine, prompts, reference, spec, workload.score)
            stats = runner.stats
            for layer, (k_err, v_err) in enumerate(zip(errors["k_rel_l2"], errors["v_rel_l2"])):
                rows.append({"rank": rank, "policy": family, "k": k, "update": update, "since_refresh": since,
                             "layer": layer, "k_rel_l2": k_err, "v_rel_l2": v_err, "kl": errors["kl"],
                             "greedy_agreement": errors["greedy_agreement"], "reward": errors["reward"],
                             "reward_fresh": errors["reward_fresh"], "refresh_s": done["refresh_s"],
                             "tokens_layers_recomputed": stats.tokens_layers_recomputed,
                             "tokens_layers_corrected": stats.tokens_layers_corrected,
                             "tokens_layers_stale": stats.tokens_layers_stale, "bytes_held": stats.bytes_held})
    df = pd.DataFrame(rows)
    df["num_layers"] = model.config.num_layers
    return df


def _spec(params: Params, quality: bool) -> ProbeSpec:
    return ProbeSpec(greedy_tokens=params.greedy_tokens if quality else 0, samples=params.samples if quality else 0,
                     temperature=params.temperature, max_tokens=params.sample_max_tokens, seed=params.seed)


def label(family: str, k) -> str:
    """A replay's display name."""
    return family if pd.isna(k) else f"{family}(k={int(k)})"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per (rank, policy, k, update): error at the last layer and averaged over layers, KL and quality probes."""
    last = df[df["layer"] == df["num_layers"] - 1]
    per_update = df.groupby(["rank", "policy", "k", "update", "since_refresh"], dropna=False, as_index=False).agg(
        k_err_mean=("k_rel_l2", "mean"), v_err_mean=("v_rel_l2", "mean"), kl=("kl", "first"),
        greedy_agreement=("greedy_agreement", "first"), reward=("reward", "first"),
        reward_fresh=("reward_fresh", "first"))
    per_update = per_update.merge(last[["rank", "policy", "k", "update", "k_rel_l2", "v_rel_l2"]].rename(
        columns={"k_rel_l2": "k_err_last", "v_rel_l2": "v_err_last"}), on=["rank", "policy", "k", "update"])
    per_update["label"] = [label(p, k) for p, k in zip(per_update["policy"], per_update["k"])]
    return per_update


def stalest(summary: pd.DataFrame, quality: bool = False) -> pd.DataFrame:
    """Per (rank, replay): the update with the most updates since its last refresh (the latest among ties), or,
    with `quality`, the same among the updates where greedy agreement and reward were probed. A replay's last
    update can be a refresh (k dividing `updates`), so this, not the last update, shows what reuse costs."""
    rows = summary.dropna(subset=["greedy_agreement"]) if quality else summary
    ordered = rows.sort_values(["since_refresh", "update"])
    return ordered.groupby(["rank", "label"], as_index=False).tail(1).sort_values(["rank", "label"])


def layer_errors(df: pd.DataFrame, summary: pd.DataFrame, rank: int) -> pd.DataFrame:
    """Per-layer K and V errors of every replay of `rank` at its stalest update, with the replay's label."""
    points = stalest(summary[summary["rank"] == rank])[["rank", "policy", "k", "update", "label"]]
    return df.merge(points, on=["rank", "policy", "k", "update"])


def macros(summary: pd.DataFrame, target: str = "fig5", at_update: int = 10) -> dict:
    """Last-layer K and V errors (%) and KL of each replay after `at_update` updates (or the last there is), per
    rank; the same at each replay's stalest update; greedy agreement (%) and reward change vs fresh at the
    stalest probed update."""
    values = {}
    point = min(at_update, int(summary["update"].max()))

    def name(row, *what):
        return macro_name(target, *what, "rank", row.rank, row.policy, "" if pd.isna(row.k) else f"k {int(row.k)}")

    for row in summary[summary["update"] == point].itertuples():
        values[name(row, "k err last")] = 100 * row.k_err_last
        values[name(row, "v err last")] = 100 * row.v_err_last
        values[name(row, "kl")] = Fixed(float(row.kl), 4)
    for row in stalest(summary).itertuples():
        values[name(row, "stalest k err last")] = 100 * row.k_err_last
        values[name(row, "stalest updates")] = int(row.since_refresh)
    for row in stalest(summary, quality=True).itertuples():
        values[name(row, "agreement")] = 100 * row.greedy_agreement
        if not pd.isna(row.reward):
            values[name(row, "reward change")] = Fixed(float(row.reward - row.reward_fresh), 3)
    values[macro_name(target, "macro update")] = point
    return values
