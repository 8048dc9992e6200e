"""fig7 end to end at the smoke profile, in both modes, resumed cell by cell, and its params' errors."""

import math

import pandas as pd
import pytest

from ember.errors import ParamsError, ReportError
from ember.experiments import budget_curves
from ember.params import load_params


@pytest.fixture(autouse=True)
def out_root(tmp_path, monkeypatch):
    """Each test's finished cells (reports/fig7/cells) in its own folder: none is reused from another test."""
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    return tmp_path


def test_context_transfer_smoke_rows_and_macros():
    params = load_params("fig7", "smoke", "items=2")
    df, provenance = budget_curves.run(params, progress=False)
    assert set(df["method"]) == set(params.methods)
    capped = df[df["cap"].notna()]
    assert (capped["bytes"] <= capped["cap"]).all()
    kv = df[df["family"].isin(["kv", "rd"]) & (df["tokens_sent"] > 0)]
    assert (kv["bytes"] == kv["bytes_total"]).all()
    summary = budget_curves.summarize(df)
    assert len(summary) == 2 + (len(params.methods) - 2) * (len(params.caps) + 1)
    assert summary["ci_low"].le(summary["accuracy"]).all() and summary["accuracy"].le(summary["ci_high"]).all()
    table = budget_curves.compare(summary)
    assert len(table) == len(params.caps) + 1 and math.isnan(table["cap"].iloc[-1])
    macros = budget_curves.macros(summary, params)
    assert "figSevenIdenticalTransferRecallCacheBeatsTextCap" in macros
    assert "figSevenIdenticalTransferRecallFullGap" in macros


def test_shared_context_smoke_trains_a_fuser_and_fuses_what_arrives():
    params = load_params("fig7", "smoke", "items=2 mode=shared_context fuser_steps=2 facts=3 "
                                          "methods=[alone,projection,kv:front:fp16,rd:proj_vnorm:int4+int8]")
    df, provenance = budget_curves.run(params, progress=False)
    assert provenance["fuser"]["trained_in_run"] and provenance["fuser"]["steps_done"] == 2
    full = df[(df["method"] == "kv:front:fp16") & df["cap"].isna()]
    assert (full["tokens_sent"] == full["context_tokens"]).all()
    none_sent = df[(df["cap"] == params.caps[0]) & (df["tokens_sent"] == 0)]
    alone = df[df["method"] == "alone"].set_index("item_id")["output"]
    for row in none_sent.itertuples():  # nothing arrived: the receiver's own cache, its own answer
        assert row.output == alone[row.item_id]
    assert not budget_curves.summarize(df).empty


@pytest.mark.parametrize("overrides,error", [
    ("methods=[alone,kv:front]", "kv:<selection>"), ("methods=[alone,zip]", "expects one of"),
    ("mode=shared_context", "fuser folder or fuser_steps"), ("task=openbookqa", "context transfer expects"),
    ("methods=[alone,context]", "at least one capped"), ("caps=[-1]", "caps"),
])
def test_bad_fig7_params_are_named(overrides, error):
    with pytest.raises(ParamsError, match=error):
        load_params("fig7", "smoke", overrides)


def test_compare_picks_the_best_of_each_side():
    rows = [("text:raw", 100.0, 0.5), ("kv:front:int8", 100.0, 0.2), ("text:raw", 1000.0, 0.5),
            ("kv:front:int8", 1000.0, 0.7), ("rd:knorm:int4+int8", 1000.0, 0.8), ("alone", float("nan"), 0.1)]
    summary = pd.DataFrame([{"method": m, "cap": c, "accuracy": a, "ci_low": a - 0.05, "ci_high": a + 0.05}
                            for m, c, a in rows])
    table = budget_curves.compare(summary)
    assert table["cache_beats_text"].tolist() == [False, True] and table["intervals_apart"].tolist() == [False, True]
    assert table["cache_method"].tolist() == ["kv:front:int8", "rd:knorm:int4+int8"]
    params = load_params("fig7", "smoke", "")
    assert budget_curves.macros(summary, params)["figSevenIdenticalTransferRecallCacheBeatsTextCap"] == "1000"


def test_fuser_command_exports_a_fuser_and_its_lora_control_for_fig7(tmp_path, capsys):
    from ember.comm.fuser_command import main

    out = tmp_path / "fuser"
    args = ["--receiver", "tiny-qwen2", "--sharer", "tiny-llama", "--pair", "tiny", "--examples", "12",
            "--recall-share", "1.0", "--steps", "3", "--batch", "4", "--hidden", "8", "--out", str(out)]
    assert main(args + ["--time-budget", "1e-9"]) == 0 and not out.exists()  # stopped: nothing exported yet
    assert main(args + ["--lora-control"]) == 0
    assert {p.name for p in out.iterdir()} == {"fuser.safetensors", "manifest.json", "train_ids.json", "lora"}
    assert not (tmp_path / "fuser.work").exists()
    params = load_params("fig7", "smoke", f"items=2 mode=shared_context fuser={out} model=tiny-qwen2 "
                                          "sharer=tiny-llama pair=tiny facts=3 methods=[alone,lora,kv:front:int8]")
    df, provenance = budget_curves.run(params, progress=False)
    assert provenance["fuser"]["steps_done"] == 3 and set(df["method"]) == {"alone", "lora", "kv:front:int8"}


def test_a_time_budget_stops_fig7_between_cells_and_the_run_resumes_to_the_same_rows(out_root, monkeypatch):
    overrides = "items=2 caps=[256] methods=[alone,text:raw,kv:front:int8]"
    clean, _ = budget_curves.run(load_params("fig7", "smoke", overrides), progress=False)
    monkeypatch.setenv("EMBER_OUT_ROOT", str(out_root / "pieces"))
    stops = 0
    while True:
        try:
            pieces = load_params("fig7", "smoke", f"{overrides} time_budget_s=0.000000001")
            resumed, provenance = budget_curves.run(pieces, progress=False)
            break
        except ReportError as error:
            stops += 1
            assert "run again to continue" in str(error)
    assert stops == 4  # alone; text:raw and kv at 256 B and full: one cell per piece
    assert len(list((out_root / "pieces" / "reports" / "fig7" / "cells").glob(f"{provenance['run_key']}-*.csv"))) == 5
    timing = [c for c in clean.columns if c.endswith("_ms")]
    pd.testing.assert_frame_equal(clean.drop(columns=timing), resumed.drop(columns=timing))


def test_force_with_a_time_budget_is_refused_instead_of_never_finishing():
    with pytest.raises(ReportError, match="force with time_budget_s=5 would recompute"):
        budget_curves.run(load_params("fig7", "smoke", "items=1 force=true time_budget_s=5"), progress=False)
