"""tab1: strategies. Per cache policy (one trainer): cumulative rollout GPU-hours, final reward, held-out
accuracy, peak memory, prefill work saved and the mean probed K/V error; the trainer ladder SFT -> best-of-N ->
DPO -> GRPO under one policy (final rewards); and unified vs dual stack: memory of one shared model vs a trainer
copy plus a rollout copy, sync latency of each way of getting the new adapter into the rollout weights, and the
rollout + update throughput end to end."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ember.experiments.cells import CellStore
from ember.experiments.cumulative_cost import summarize as summarize_policies
from ember.experiments.cumulative_cost import with_cumulative
from ember.experiments.rl_runs import POLICIES, RLParams, check_names, load_engine, prompt_sets, rl_cells, rl_store
from ember.params import param
from ember.report import Fixed, latex_escaped, macro_name, report_dir
from ember.train import TRAINERS, TrainConfig, make_trainer
from ember.train.sync import measure_sync

LADDER = ("sft", "best_of_n", "dpo", "grpo")


@dataclass(frozen=True)
class Params(RLParams):
    """The policies (each with `trainer`), the ladder of trainers (each under `ladder_policy`), sync repeats."""

    policies: tuple[str, ...] = param(POLICIES, choices=POLICIES)
    trainer: str = param("grpo", choices=tuple(TRAINERS))
    ladder: tuple[str, ...] = param(LADDER, choices=LADDER)
    ladder_policy: str = param("prefix_only", choices=POLICIES)
    sync_repeats: int = param(3, low=1)

    def validate(self) -> None:
        super().validate()
        check_names(self, "policies", POLICIES)
        check_names(self, "ladder", LADDER)


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Cells: one RL run per (policy, trainer) pair needed (shared between the policy rows and the ladder, and
    with fig3 through `rl_store`), then the sync measurement. Rows carry `kind` = rl or sync."""
    engine = load_engine(params)
    task, held_out = prompt_sets(engine, params)
    runs = [(p, params.trainer) for p in params.policies] + [(params.ladder_policy, t) for t in params.ladder]
    store = rl_store(params)
    rl = store.run(rl_cells(engine, params, store, runs, task, held_out, progress), progress)
    sync = CellStore(params, params.time_budget_s).run({"sync": lambda: _sync_cell(engine, params, task)}, progress)
    df = pd.concat([rl, sync], ignore_index=True)
    df["kind"] = "rl"
    df.loc[df["method"].notna(), "kind"] = "sync"
    return df, engine.provenance


def _sync_cell(engine, params: Params, task) -> pd.DataFrame:
    """Sync latency and weight memory of each stack, with an adapter of the run's shape that has been stepped
    once (so its B is not zero)."""
    trainer = make_trainer("sft", engine.model, TrainConfig(rank=params.rank, alpha=params.alpha,
                                                            targets=params.targets, seed=params.seed),
                           engine._pad_id)
    trainer.step(list(task.examples)[:1])
    rows = measure_sync(engine, trainer.adapter.to(), report_dir(params.target) / "sync", params.sync_repeats)
    return pd.DataFrame(rows)


def policy_table(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per policy (runs of `params.trainer`): the fig3 summary of those runs."""
    rl = df[(df["kind"] == "rl") & (df["trainer"] == params.trainer) & df["policy_key"].isin(params.policies)]
    return summarize_policies(with_cumulative(rl))


def ladder_table(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per trainer of the ladder (under `ladder_policy`): final reward (mean of the last two rounds), held-out
    accuracy, first-round reward, training seconds and tokens."""
    rl = df[(df["kind"] == "rl") & (df["policy_key"] == params.ladder_policy) & df["trainer"].isin(params.ladder)]
    last = rl[rl["round"] >= rl["round"].max() - 1]
    table = rl.groupby("trainer", as_index=False).agg(train_s=("train_s", "sum"), train_tokens=("train_tokens", "sum"),
                                                     held_out_accuracy=("held_out_accuracy", "first"))
    table["first_reward"] = table["trainer"].map(rl[rl["round"] == 0].groupby("trainer")["reward"].mean())
    table["final_reward"] = table["trainer"].map(last.groupby("trainer")["reward"].mean())
    order = {name: i for i, name in enumerate(params.ladder)}
    return table.sort_values("trainer", key=lambda s: s.map(order)).reset_index(drop=True)


def stack_table(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per sync method: its latency, the weights each stack holds, the peak memory of a round (the unified run's
    measured peak, plus the second copy for a dual stack), and the rollout + update tokens per second of the
    Naive run (or the first policy's) with that sync in place of the swap it measured."""
    sync = df[df["kind"] == "sync"][["method", "sync_s", "weights_bytes"]].reset_index(drop=True)
    policy = "naive" if "naive" in params.policies else params.policies[0]
    run = df[(df["kind"] == "rl") & (df["policy_key"] == policy) & (df["trainer"] == params.trainer)]
    sync["peak_memory_bytes"] = run["peak_memory_bytes"].max() + sync["weights_bytes"] - sync["weights_bytes"].min()
    tokens = (run["generated_tokens"] + run["train_tokens"]).sum()
    busy = (run["rollout_s"] + run["train_s"]).sum()
    sync["tokens_per_s"] = tokens / (busy + len(run) * sync["sync_s"])
    return sync


def macros(policies: pd.DataFrame, ladder: pd.DataFrame, stack: pd.DataFrame, target: str = "tab1") -> dict:
    """Headline numbers: per policy GPU time saved vs Naive (%), per trainer final reward, sync seconds of each
    method and how many times slower than the in-place swap the dual stack's sync is."""
    values = {}
    for row in policies.itertuples():
        saved = getattr(row, "rollout_saved_pct_vs_naive", None)
        if saved is not None and row.policy_key != "naive":
            values[macro_name(target, row.policy_key, "time saved vs naive")] = float(saved)
    for row in ladder.itertuples():
        values[macro_name(target, row.trainer, "final reward")] = Fixed(float(row.final_reward), 3)
    swap = stack["sync_s"].iloc[0]
    for row, key in zip(stack.itertuples(), ("swap", "copy", "reload")):
        values[macro_name(target, key, "sync ms")] = 1000 * float(row.sync_s)
        if key != "swap":
            values[macro_name(target, key, "sync x swap")] = float(row.sync_s / swap)
    return values


def latex_tables(policies: pd.DataFrame, ladder: pd.DataFrame, stack: pd.DataFrame) -> dict[str, str]:
    """The three tables as LaTeX (df.to_latex), columns renamed for print, text cells escaped."""
    cols = {"policy": "Policy", "rollout_hours": "Rollout GPU-h", "final_reward": "Final reward",
            "held_out_accuracy": "Held-out acc.", "peak_memory_bytes": "Peak mem. (GB)",
            "prefill_work_saved_pct_vs_naive": "Prefill saved (\\%)", "k_rel_l2": "K err.", "v_rel_l2": "V err."}
    table = policies[[c for c in cols if c in policies]].copy()
    table["peak_memory_bytes"] = table["peak_memory_bytes"] / 1e9
    ladder_cols = {"trainer": "Trainer", "first_reward": "First reward", "final_reward": "Final reward",
                   "held_out_accuracy": "Held-out acc.", "train_s": "Train (s)"}
    stack_cols = {"method": "Sync", "sync_s": "Latency (s)", "weights_bytes": "Weights (GB)",
                  "peak_memory_bytes": "Peak mem. (GB)", "tokens_per_s": "Tokens/s"}
    sync = stack[list(stack_cols)].copy()
    sync[["weights_bytes", "peak_memory_bytes"]] = sync[["weights_bytes", "peak_memory_bytes"]] / 1e9
    tables = {"tab1_policies": table.rename(columns=cols), "tab1_ladder": ladder[list(ladder_cols)].rename(
        columns=ladder_cols), "tab1_stack": sync.rename(columns=stack_cols)}
    return {name: latex_escaped(t).to_latex(index=False, float_format="%.3g") for name, t in tables.items()}
