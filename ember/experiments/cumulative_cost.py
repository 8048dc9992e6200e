"""fig3: cumulative rollout cost of R rounds of real in-process RL under each cache policy, with the reward each
reaches. Every policy runs its own training from the base model (GRPO by default; UpdateLocality(N) trains only
layers >= N), so a policy that serves stale K/V also trains on what it sampled from it. Per round: rollout
prefill / decode / sampling and the policy's refresh work (the rollout's GPU time), training, swap, memory."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ember.experiments.rl_runs import POLICIES, RLParams, check_names, load_engine, prompt_sets, rl_cells, rl_store
from ember.params import param
from ember.report import Fixed, macro_name
from ember.train import TRAINERS


@dataclass(frozen=True)
class Params(RLParams):
    """The policies compared and the trainer every one of them runs."""

    policies: tuple[str, ...] = param(POLICIES, choices=POLICIES)
    trainer: str = param("grpo", choices=tuple(TRAINERS))

    def validate(self) -> None:
        super().validate()
        check_names(self, "policies", POLICIES)


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """One cell per policy (resumable per round; shared with tab1 through `rl_store`); rows per (policy, round)."""
    engine = load_engine(params)
    task, held_out = prompt_sets(engine, params)
    store = rl_store(params)
    cells = rl_cells(engine, params, store, [(p, params.trainer) for p in params.policies], task, held_out, progress)
    return with_cumulative(store.run(cells, progress)), engine.provenance


def with_cumulative(df: pd.DataFrame) -> pd.DataFrame:
    """Adds the cumulative rollout seconds and prefill work of each run over its rounds."""
    df = df.sort_values(["policy_key", "round"], kind="stable").reset_index(drop=True)
    grouped = df.groupby("policy_key", sort=False)
    df["cum_rollout_s"] = grouped["rollout_s"].cumsum()
    df["cum_tokens_layers"] = grouped["tokens_layers_recomputed"].cumsum()
    return df


def summarize(df: pd.DataFrame, tail: int = 2) -> pd.DataFrame:
    """Per policy: total rollout seconds (and hours) and the median round's (robust to a one-off slow round),
    prefill work, the final reward (mean of the last `tail`
    rounds' rollout rewards), held-out accuracy, peak memory and its growth (the peak of the later half of the
    rounds minus that of the earlier half), mean probed
    K/V error; savings vs Naive and vs PrefixOnly and the final-reward difference vs Naive."""
    last = df[df["round"] >= df["round"].max() - tail + 1]
    probed = "k_rel_l2" in df.columns
    summary = df.groupby(["policy_key", "policy"], as_index=False, sort=False).agg(
        rollout_s=("rollout_s", "sum"), median_round_rollout_s=("rollout_s", "median"),
        prefill_s=("prefill_s", "sum"), refresh_s=("refresh_s", "sum"),
        decode_s=("decode_s", "sum"), train_s=("train_s", "sum"), swap_s=("swap_s", "sum"),
        tokens_layers=("tokens_layers_recomputed", "sum"), held_out_accuracy=("held_out_accuracy", "first"),
        peak_memory_bytes=("peak_memory_bytes", "max"), cache_bytes=("cache_bytes", "max"),
        **({"k_rel_l2": ("k_rel_l2", "mean"), "v_rel_l2": ("v_rel_l2", "mean"), "kl": ("kl", "mean")}
           if probed else {}))
    summary["rollout_hours"] = summary["rollout_s"] / 3600
    final = last.groupby("policy_key")["reward"].mean()
    summary["final_reward"] = summary["policy_key"].map(final)
    half = df["round"] >= (df["round"].max() + 1) / 2
    late = df[half].groupby("policy_key")["peak_memory_bytes"].max()
    early = df[~half].groupby("policy_key")["peak_memory_bytes"].max()
    summary["memory_growth_bytes"] = summary["policy_key"].map(late - early).fillna(0)
    for baseline, suffix in (("naive", "vs_naive"), ("prefix_only", "vs_prefix_only")):
        base = summary[summary["policy_key"] == baseline]
        if len(base):
            summary[f"rollout_saved_pct_{suffix}"] = 100 * (1 - summary["rollout_s"] / base["rollout_s"].iloc[0])
            summary[f"prefill_work_saved_pct_{suffix}"] = 100 * (1 - summary["tokens_layers"] /
                                                                 base["tokens_layers"].iloc[0])
            summary[f"reward_diff_{suffix}"] = summary["final_reward"] - base["final_reward"].iloc[0]
    return summary


def memory_report(summary: pd.DataFrame) -> dict:
    """Per policy: peak memory, its growth from the earlier to the later half of the rounds and the cache bytes
    held (for the manifest: a flat run grows by no more than the cache it holds)."""
    return {row.policy: {"peak_memory_bytes": int(row.peak_memory_bytes),
                         "growth_bytes": int(row.memory_growth_bytes),
                         "cache_bytes_max": int(row.cache_bytes)} for row in summary.itertuples()}


def macros(summary: pd.DataFrame, target: str = "fig3") -> dict:
    """Per policy (other than the baseline itself): rollout GPU time saved (%) vs Naive and vs PrefixOnly and
    the final-reward difference vs Naive; the policy that saves the most vs Naive."""
    values = {}
    for row in summary.itertuples():
        for suffix, label in (("vs_naive", "vs naive"), ("vs_prefix_only", "vs prefix only")):
            saved = getattr(row, f"rollout_saved_pct_{suffix}", None)
            if saved is not None and row.policy_key not in ("naive", suffix[3:]):
                values[macro_name(target, row.policy_key, "time saved", label)] = float(saved)
        diff = getattr(row, "reward_diff_vs_naive", None)
        if diff is not None and row.policy_key != "naive":
            values[macro_name(target, row.policy_key, "reward diff vs naive")] = Fixed(float(diff), 3)
    if "rollout_saved_pct_vs_naive" in summary.columns:
        best = summary.loc[summary["rollout_saved_pct_vs_naive"].idxmax()]
        values[macro_name(target, "best policy")] = str(best["policy"])
        values[macro_name(target, "best time saved vs naive")] = float(best["rollout_saved_pct_vs_naive"])
    return values
