"""fig4 / fig5 experiments at smoke size: trajectories replayed instead of retrained, runs stopped by their time
budget resume from the stored cells with the same numbers, and UpdateLocality's rollouts equal Naive's."""

import pytest

from ember.errors import ParamsError, ReportError
from ember.experiments import stale_kv, update_locality
from ember.params import load_params
from ember.train import sft

NON_TIMING_FIG5 = ["rank", "policy", "k", "update", "since_refresh", "layer", "k_rel_l2", "v_rel_l2", "kl",
                   "greedy_agreement", "reward", "reward_fresh", "tokens_layers_corrected", "tokens_layers_stale"]


@pytest.fixture(autouse=True)
def _scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))


def test_fig5_resumes_after_its_time_budget_with_the_same_numbers(tmp_path, monkeypatch):
    overrides = {"ranks": [2, 3], "updates": 2, "time_budget_s": 1e-9}
    with pytest.raises(ReportError, match="1 of 2 cells finished"):
        stale_kv.run(load_params("fig5", "smoke", overrides))
    calls = []
    real_step = sft.SFTTrainer.step
    monkeypatch.setattr(sft.SFTTrainer, "step", lambda self, batch: calls.append(1) or real_step(self, batch))
    resumed, _ = stale_kv.run(load_params("fig5", "smoke", {**overrides, "time_budget_s": 0.0}))
    assert len(calls) == 2  # only the second rank was trained: the first cell came from the store
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "uninterrupted"))
    fresh, _ = stale_kv.run(load_params("fig5", "smoke", {**overrides, "time_budget_s": 0.0}))
    assert resumed[NON_TIMING_FIG5].equals(fresh[NON_TIMING_FIG5])


def test_fig5_errors_are_zero_right_after_a_refresh_and_grow_when_stale():
    df, _ = stale_kv.run(load_params("fig5", "smoke", {"ranks": [2], "updates": 3}))
    summary = stale_kv.summarize(df)
    refreshed = summary[summary["since_refresh"] == 0]
    assert len(refreshed) and refreshed["k_err_last"].max() < 1e-5
    stale = summary[summary["policy"] == "KeepStale"].sort_values("update")
    assert (stale["k_err_last"].diff().dropna() > 0).all()


def test_fig4_trajectory_is_replayed_not_retrained_and_update_locality_is_exact(monkeypatch):
    params = load_params("fig4", "smoke", {"frozen_fractions": [0.0, 0.5]})
    df, _ = update_locality.run(params)
    assert df["same_tokens_as_naive"].all()
    monkeypatch.setattr(sft.SFTTrainer, "step", lambda self, batch: pytest.fail("trained again"))
    for cell in (update_locality.report_dir("fig4") / "cells").iterdir():
        cell.unlink()  # the cell runs again: only its trajectory may come from disk
    again, _ = update_locality.run(params)
    assert again["reward"].tolist() == df["reward"].tolist()
    summary = update_locality.summarize(df).set_index(["frozen_fraction", "policy"])
    assert summary.loc[(0.5, "UpdateLocality"), "tokens_layers_saved_pct"] > 0
    assert summary.loc[(0.5, "UpdateLocality"), "tokens_layers_saved_pct_vs_prefix_only"] > 0  # locality itself
    assert summary.loc[(0.0, "Naive"), "reward_change"] == 0.0


def test_fig4_needs_training_every_layer_as_its_reference():
    with pytest.raises(ParamsError, match="expected 0.0 among them"):
        load_params("fig4", "smoke", {"frozen_fractions": [0.5]})
