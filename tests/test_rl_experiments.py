"""fig3 / tab1 at smoke size: a run stopped by its time budget mid-way through a policy's rounds resumes from
that run's checkpoint to the uninterrupted numbers; exact policies roll out what Naive rolls out; the dual
stack's merged copy computes what the unified model with the adapter computes; bad params are clear errors."""

import dataclasses
import json

import pandas as pd
import pytest
import torch

from ember.engine import Engine
from ember.errors import ParamsError, ReportError
from ember.experiments import cumulative_cost, rl_runs, strategies
from ember.experiments.rl_runs import RL_RUNS, RLParams
from ember.models import load
from ember.models.lora import LoraAdapter, attach, kept_bindings, lora_modules
from ember.params import load_params
from ember.train.sync import measure_sync, merged_state

TIMING = {"prefill_s", "decode_s", "sampling_s", "refresh_s", "train_s", "swap_s", "rollout_s", "cum_rollout_s",
          "peak_memory_bytes", "rss_peak_bytes"}


@pytest.fixture(autouse=True)
def _scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))


def _untimed(df):
    return df[[c for c in df.columns if c not in TIMING]].reset_index(drop=True)


def test_fig3_resumes_mid_run_after_its_time_budget_with_the_same_numbers(tmp_path, monkeypatch):
    overrides = {"policies": ["naive", "keep_stale"], "rounds": 3, "time_budget_s": 1e-9}
    with pytest.raises(ReportError, match="stopped after round 0 of 3"):
        cumulative_cost.run(load_params("fig3", "smoke", overrides))
    checkpoints = list((tmp_path / "reports" / RL_RUNS / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "LATEST").read_text() == "round-0000"
    resumed, _ = cumulative_cost.run(load_params("fig3", "smoke", {**overrides, "time_budget_s": 0.0}))
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "uninterrupted"))
    fresh, _ = cumulative_cost.run(load_params("fig3", "smoke", {**overrides, "time_budget_s": 0.0}))
    assert _untimed(resumed).equals(_untimed(fresh))
    summary = cumulative_cost.summarize(fresh).set_index("policy_key")
    assert summary.loc["keep_stale", "prefill_work_saved_pct_vs_naive"] > 0
    assert summary.loc["keep_stale", "k_rel_l2"] > 0 == summary.loc["naive", "k_rel_l2"]


def test_fig3_exact_policies_train_the_same_run_as_naive():
    df, _ = cumulative_cost.run(load_params("fig3", "smoke", {"policies": ["naive", "prefix_only"], "rounds": 2}))
    naive, prefix = (df[df["policy_key"] == p].reset_index(drop=True) for p in ("naive", "prefix_only"))
    assert naive["reward"].tolist() == prefix["reward"].tolist()
    assert naive["train_loss"].tolist() == pytest.approx(prefix["train_loss"].tolist(), abs=1e-5)
    assert (prefix["hits"] > 0).all() and (naive["hits"] == 0).all()
    macros = cumulative_cost.macros(cumulative_cost.summarize(df))
    assert "figThreePrefixOnlyTimeSavedVsNaive" in macros


def test_tab1_tables_cover_policies_ladder_and_stacks():
    params = load_params("tab1", "smoke", {"policies": ["naive", "prefix_only"], "ladder": ["sft", "grpo"]})
    df, _ = strategies.run(params)
    policies, ladder = strategies.policy_table(df, params), strategies.ladder_table(df, params)
    stack = strategies.stack_table(df, params)
    assert sorted(policies["policy_key"]) == ["naive", "prefix_only"] and list(ladder["trainer"]) == ["sft", "grpo"]
    assert stack["weights_bytes"].iloc[1] == 2 * stack["weights_bytes"].iloc[0]  # a second copy of the weights
    assert set(strategies.latex_tables(policies, ladder, stack)) == {"tab1_policies", "tab1_ladder", "tab1_stack"}
    assert "\\begin{tabular}" in strategies.latex_tables(policies, ladder, stack)["tab1_stack"]


def test_tab1_reuses_the_rl_runs_fig3_made_instead_of_running_them_again(monkeypatch):
    fig3 = load_params("fig3", "smoke", {"policies": ["naive", "prefix_only"], "rounds": 1})
    made, _ = cumulative_cost.run(fig3)
    shape = load_params("tab1", "smoke")
    same_run = {f.name: list(v) if isinstance(v, tuple) else v for f in dataclasses.fields(RLParams)
                if f.name not in ("target", "profile") and (v := getattr(fig3, f.name)) != getattr(shape, f.name)}
    tab1 = load_params("tab1", "smoke", {**same_run, "policies": ["naive", "prefix_only"], "trainer": fig3.trainer,
                                         "ladder": [fig3.trainer], "ladder_policy": "prefix_only"})
    monkeypatch.setattr(rl_runs, "rl_cell", lambda *a, **k: pytest.fail("an RL run fig3 made ran again"))
    df, _ = strategies.run(tab1)
    rl = df[df["kind"] == "rl"].dropna(axis=1, how="all").drop(columns="kind")
    pd.testing.assert_frame_equal(_untimed(rl), _untimed(made[rl.columns]), check_dtype=False)
    assert (df["kind"] == "sync").any()


def test_the_merged_copy_computes_what_the_model_with_its_adapter_computes(tmp_path):
    loaded = load("tiny-qwen3")
    model = loaded.model
    adapter = LoraAdapter.create(model, 4, 8.0, seed=3)
    with torch.no_grad():
        for _, b in adapter.weights.values():
            b.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad(), kept_bindings(lora_modules(model).values()):
        attach(model, adapter)
        expected = model(ids)
    twin = load("tiny-qwen3").model
    with torch.no_grad():
        for name, value in merged_state(model, adapter).items():
            dict(twin.named_parameters())[name].copy_(value)
        assert torch.allclose(twin(ids), expected, atol=1e-5)
    engine = Engine(model, loaded.tokenizer, progress=False, cuda_graphs=False)
    rows = measure_sync(engine, adapter, tmp_path, repeats=1)
    assert [r["method"].split()[0] for r in rows] == ["in-place", "copy", "reload"]
    assert engine.active_adapter is None and engine.adapters == [] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("target, overrides, match", [
    ("fig3", {"policies": ["naive", "naive"]}, "distinct names"),
    ("fig3", {"policies": ["lru"]}, "expected one of"),
    ("fig3", {"probe_prompts": 5}, "at most prompts"),
    ("tab1", {"ladder": []}, "at least one value"),
    ("fig3", {"task": "chess"}, "expected one of"),
])
def test_bad_rl_params_are_clear_errors(target, overrides, match):
    with pytest.raises(ParamsError, match=match):
        load_params(target, "smoke", overrides)


def test_rl_round_benchmark_measures_and_summarizes_a_run(tmp_path):
    from ember.bench import rl_round

    out = tmp_path / "rl_round.json"
    assert rl_round.main(["--model", "tiny-qwen3", "--prompts", "2", "--candidates", "2", "--max-tokens", "3",
                          "--rounds", "1", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["rounds_measured"] == 1 and report["rollout_s"] > 0 and report["rollout_tokens_per_s"] > 0
    with pytest.raises(ReportError, match="expected results.csv and manifest.json"):
        rl_round.from_run(tmp_path)


def test_fig3_runs_on_the_sql_task():
    df, _ = cumulative_cost.run(load_params("fig3", "smoke", {"task": "sql", "policies": ["prefix_only"],
                                                              "rounds": 1}))
    assert len(df) == 1 and 0.0 <= df["reward"].iloc[0] <= 1.0 and df["hits"].iloc[0] > 0
