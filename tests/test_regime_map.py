"""fig8: long contexts from the pinned filler, stored wire blobs, the cell registry, sequential vs simultaneous
execution, and the regime analysis (tie-breaks, paired bootstrap, closest calls, flips)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from ember.comm.items import comm_items
from ember.comm.long_context import FILLER_VERSION, filler_corpus, long_items, pad_with_filler
from ember.comm.messages import SharerSide, StoredMessages
from ember.comm.transfer import KVMethod
from ember.engine import Engine
from ember.errors import CommError, ParamsError, ReportError
from ember.experiments import regime_map
from ember.models.tokenizer import CharTokenizer
from ember.params import load_params
from ember.tasks.extraction import CITIES
from ember.tasks.recall import NAMES

CHARS = CharTokenizer()
TIMING = re.compile(r"_ms$")


def count(text: str) -> int:
    return len(CHARS.encode(text))


# ---- long contexts ---------------------------------------------------------------------------------------

def test_filler_never_answers_a_question():
    corpus = " ".join(filler_corpus())
    assert not re.search(r"\d", corpus)
    assert not any(re.search(rf"\b{word}\b", corpus) for word in NAMES + CITIES)
    assert FILLER_VERSION and len(filler_corpus()) >= 1000


@pytest.mark.parametrize("task", ["recall", "extraction"])
@pytest.mark.parametrize("bucket", [300, 1200])
def test_long_items_fill_the_bucket_keep_the_task_and_record_the_fact(task, bucket):
    items = long_items(task, 3, 5, bucket, count, facts=4)
    assert [x.item.item_id for x in items] == [x.item.item_id for x in long_items(task, 3, 5, bucket, count, 4)]
    assert [x.item.context for x in items] == [x.item.context for x in long_items(task, 3, 5, bucket, count, 4)]
    plain = comm_items(task, 3, 5, facts=4 if task == "recall" else 0)
    for x, short in zip(items, plain):
        assert x.bucket == bucket and x.context_len == count(x.item.context)
        assert 0.85 * bucket <= x.context_len <= bucket
        sentences = [s if s.endswith(".") else s + "." for s in short.context.split(". ")]
        found = [x.item.context.index(s) for s in sentences]
        assert found == sorted(found)  # every task sentence, in order
        key = (f"The code for {short.source.key} is {short.answer}." if task == "recall" else sentences[0])
        assert x.item.context[round(x.fact_position * len(x.item.context)):].startswith(key)
        assert x.item.score(short.answer if task == "recall" else short.answer)


def test_long_items_on_a_real_tokenizer(package_model):
    from ember.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(package_model("smollm2-135m-instruct"))
    real = lambda text: len(tokenizer.encode(text))  # noqa: E731
    for x in long_items("recall", 2, 0, 512, real, facts=10):
        assert 480 <= x.context_len == real(x.item.context) <= 512


def test_a_bucket_smaller_than_the_task_is_an_error():
    with pytest.raises(CommError, match="fit in 20 tokens"):
        pad_with_filler(["The code for Alice is 1234."], 0, 20, count, "s")
    with pytest.raises(CommError, match="task"):
        long_items("gsm8k", 1, 0, 512, count)


# ---- stored messages -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return Engine.load("tiny-qwen2", progress=False, prefix_cache=False)


def test_stored_messages_equal_live_ones_and_refuse_a_tampered_blob(tiny, tmp_path):
    item = comm_items("recall", 1, 0, facts=3)[0]
    method = KVMethod("vnorm", ("int4", "int8"))
    live = SharerSide(tiny).encode(item, method, 2048, 3)
    stored = StoredMessages(tmp_path, SharerSide(tiny))
    first = stored.encode(item, method, 2048, 3)
    again = StoredMessages(tmp_path).encode(item, method, 2048, 3)  # no sharer: read from disk
    for sent in (first, again):
        assert sent.encoded.blob == live.encoded.blob and sent.encoded.groups == live.encoded.groups
        assert sent.context_tokens == live.context_tokens and sent.sharer_head == live.sharer_head
    path = stored.blob_path(item, method, 2048)
    assert path.name == "rd-vnorm-int4+int8@2048.kvw"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CommError, match="sidecar describes"):
        StoredMessages(tmp_path).encode(item, method, 2048, 3)
    with pytest.raises(CommError, match="expected a stored message"):
        StoredMessages(tmp_path).encode(item, method, 4096, 3)
    with pytest.raises(CommError, match="source.json"):
        StoredMessages(tmp_path / "empty")
    (tmp_path / "source.json").write_text('{"cache_shape": [24, 2, 64]}\n')  # blobs of another sharer
    with pytest.raises(CommError, match="another sharer"):
        StoredMessages(tmp_path, SharerSide(tiny))


# ---- the sweep: registry, sequential vs simultaneous, resume ---------------------------------------------

def smoke(**overrides):
    text = " ".join(f"{k}={v}" for k, v in overrides.items())
    return load_params("fig8", "smoke", text)


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if not TIMING.search(c)]
    keys = ["pair", "task", "context_len_bucket", "shard", "method", "cap", "item_id"]
    out = df[keep].assign(cap=df["cap"].astype(float)).sort_values(keys).reset_index(drop=True)
    return out.astype({c: object for c in out.columns})


def test_sequential_and_simultaneous_give_identical_results(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "seq"))
    sequential, _ = regime_map.run(smoke(sequential="true", keep_blobs="true"), progress=False)
    assert list((tmp_path / "seq" / "reports" / "fig8" / "wire_blobs").glob("*/*/*.kvw"))
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "sim"))
    simultaneous, _ = regime_map.run(smoke(sequential="false"), progress=False)
    assert not (tmp_path / "sim" / "reports" / "fig8" / "wire_blobs").exists()
    pd.testing.assert_frame_equal(comparable(sequential), comparable(simultaneous))
    assert set(sequential["context_len_bucket"]) == {96, 192}
    assert sequential["fact_position"].between(0, 1).all()


def test_finished_cells_are_reused_grown_and_forced(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    cells = tmp_path / "reports" / "fig8" / "cells"
    first, _ = regime_map.run(smoke(), progress=False)
    stored = sorted(cells.glob("*.csv"))
    stamps = {p: p.stat().st_mtime_ns for p in stored}

    def no_models(*args, **kwargs):
        raise AssertionError("a finished sweep must not load a model")

    monkeypatch.setattr(Engine, "load", no_models)
    again, _ = regime_map.run(smoke(), progress=False)
    pd.testing.assert_frame_equal(comparable(first), comparable(again))
    monkeypatch.undo()
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    grown, _ = regime_map.run(smoke(caps="[256,1024,4096]"), progress=False)  # one more cap: only its cells
    assert len(list(cells.glob("*.csv"))) > len(stored)
    assert all(p.stat().st_mtime_ns == stamps[p] for p in stored)
    assert 1024 in set(grown["cap"])
    regime_map.run(smoke(items=3), progress=False)  # other items: other cells, the old ones untouched
    assert all(p.stat().st_mtime_ns == stamps[p] for p in stored)
    regime_map.run(smoke(force="true"), progress=False)
    assert all(p.stat().st_mtime_ns != stamps[p] for p in stored)


def test_a_crashed_receiver_resumes_from_the_saved_blobs(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "clean"))
    clean, _ = regime_map.run(smoke(buckets="[96]", stability_shards=0), progress=False)
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "crash"))
    calls = {"n": 0}
    original = regime_map.Harness.run

    def crash_after_three(self, methods, caps):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("receiver crashed")
        return original(self, methods, caps)

    monkeypatch.setattr(regime_map.Harness, "run", crash_after_three)
    with pytest.raises(RuntimeError, match="receiver crashed"):
        regime_map.run(smoke(buckets="[96]", stability_shards=0), progress=False)
    assert list((tmp_path / "crash" / "reports" / "fig8" / "wire_blobs").glob("*/*/*.kvw"))
    monkeypatch.setattr(regime_map.Harness, "run", original)

    def no_sharer(*args, **kwargs):
        raise AssertionError("the sharer must not run again: its blobs are saved")

    monkeypatch.setattr(SharerSide, "encode", no_sharer)
    monkeypatch.setattr(SharerSide, "hints", no_sharer)
    resumed, _ = regime_map.run(smoke(buckets="[96]", stability_shards=0), progress=False)
    pd.testing.assert_frame_equal(comparable(clean), comparable(resumed))
    assert not list((tmp_path / "crash" / "reports" / "fig8" / "wire_blobs").glob("*/*/*.kvw"))  # done: removed


def test_a_time_budget_stops_after_progress_and_the_sweep_resumes_to_the_same_result(tmp_path, monkeypatch):
    grid = dict(buckets="[96]", stability_shards=0, caps="[256]", methods="[alone,text:raw,kv:front:int8]")
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "clean"))
    clean, _ = regime_map.run(smoke(**grid), progress=False)
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "pieces"))
    cells = tmp_path / "pieces" / "reports" / "fig8" / "cells"
    stops = 0
    while True:
        try:
            resumed, _ = regime_map.run(smoke(time_budget_s="0.000000001", **grid), progress=False)
            break
        except ReportError as error:
            stops += 1
            assert "run again to continue" in str(error) and len(list(cells.glob("*.csv"))) == stops
    assert stops == len(clean.groupby(["method", "cap"], dropna=False)) - 1  # one cell per piece
    pd.testing.assert_frame_equal(comparable(clean), comparable(resumed))


def test_a_projector_pair_through_the_sweep_sequential_equals_simultaneous(tmp_path, monkeypatch):
    from ember.comm.data import transfer_training_items
    from ember.comm.train_fuser import FuserConfig, export_fuser, train_fuser

    receiver = Engine.load("tiny-qwen2", prefix_cache=False, progress=False)
    sharer = Engine.load("tiny-llama", prefix_cache=False, progress=False)
    items = transfer_training_items(4, seed=0, extraction_share=0.0, facts=2)
    run = train_fuser(receiver, sharer, items, FuserConfig(hidden=8, steps=2, batch=2, checkpoint_every=2),
                      folder=tmp_path / "work", kind="projector", progress=False)
    folder = export_fuser(run, tmp_path / "projector", {"pair": "other"}, [item.item_id for item in items])
    grid = dict(pairs="[other]", sharers="[tiny-llama]", projectors=f"[{folder}]", buckets="[96]",
                stability_shards=0, caps="[512]", methods="[alone,text:raw,kv:proj_vnorm:int8,kv:front:int8]")
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "seq"))
    sequential, provenance = regime_map.run(smoke(sequential="true", **grid), progress=False)
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "sim"))
    simultaneous, _ = regime_map.run(smoke(sequential="false", **grid), progress=False)
    pd.testing.assert_frame_equal(comparable(sequential), comparable(simultaneous))
    assert provenance["projector:other"]["folder"] == str(folder) and "sharer:other" in provenance
    projected = sequential[(sequential["method"] == "kv:proj_vnorm:int8") & (sequential["cap"] == 512)]
    assert len(projected) and (projected["bytes"] <= 512).all() and (projected["project_ms"] >= 0).all()


def test_the_closest_call_is_rerun_on_another_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    monkeypatch.setattr(regime_map, "closest_calls",
                        lambda df, params: {(0, "recall", 96, 256): ["kv:front:int8", "text:raw"]})
    df, _ = regime_map.run(smoke(), progress=False)
    extra = df[df["shard"] == 1]
    assert set(extra["method"]) == {"kv:front:int8", "text:raw"} and set(extra["cap"]) == {256}
    assert not set(extra["item_id"]) & set(df[df["shard"] == 0]["item_id"])
    table = regime_map.regime_table(df, smoke())
    assert set(table["shard"]) == {0, 1}


def test_params_are_checked():
    with pytest.raises(ParamsError, match="one sharer and one projector per pair"):
        smoke(pairs="[a,b]")
    with pytest.raises(ParamsError, match="compares cache with text"):
        smoke(methods="[alone,kv:front:int8]")


# ---- analysis on hand-made rows --------------------------------------------------------------------------

def rows(method, cap, correct, nbytes, ms=10.0, shard=0):
    return [{"pair": "p", "task": "recall", "context_len_bucket": 512, "shard": shard, "method": method,
             "family": method.split(":")[0], "cap": cap, "item_id": f"i{k}", "correct": bool(c), "bytes": nbytes,
             "tokens_sent": 1, "truncated": False, "e2e_ms": ms, "context_tokens": 10} for k, c in enumerate(correct)]


def test_paired_bootstrap_bounds():
    ones, zeros = np.ones(20), np.zeros(20)
    assert regime_map.paired_bootstrap(ones, zeros, 200, 0) == (1.0, 1.0)
    assert regime_map.paired_bootstrap(ones, ones, 200, 0) == (0.0, 0.0)
    mixed = np.array([1, 0] * 10, dtype=float)
    low, high = regime_map.paired_bootstrap(mixed, zeros, 500, 0)
    assert 0 < low < 0.5 < high <= 1
    with pytest.raises(CommError, match="equal"):
        regime_map.paired_bootstrap(ones, np.ones(3), 10, 0)


def test_ties_go_to_fewer_bytes_then_lower_latency_and_the_winner_needs_its_interval():
    good = [1] * 9 + [0]
    df = pd.DataFrame(rows("kv:front:int8", 100, good, 90) + rows("rd:vnorm:int4+int8", 100, good, 80)
                      + rows("text:raw", 100, [0] * 10, 100) + rows("text:hint", 100, [0] * 10, 100, ms=5.0)
                      + rows("kv:front:int8", 1000, [1] * 5 + [0] * 5, 900)
                      + rows("text:raw", 1000, [1] * 5 + [0] * 5, 1000))
    params = smoke(bootstrap=300, pairs="[p]")
    table = regime_map.regime_table(df, params).set_index("cap")
    assert table.loc[100, "cache_method"] == "rd:vnorm:int4+int8" and table.loc[100, "cache_tie_break"] == "bytes"
    assert table.loc[100, "text_method"] == "text:hint" and table.loc[100, "text_tie_break"] == "latency"
    assert table.loc[100, "winner"] == "cache" and table.loc[100, "diff_points"] == pytest.approx(90)
    assert table.loc[1000, "winner"] == "tie" and table.loc[1000, "cache_tie_break"] == "accuracy"
    flips = regime_map.flips(table.reset_index(), df, params).iloc[0]
    assert flips["cache_wins_from"] == 100 and flips["cache_ahead_from"] == 100 and flips["flip_cap"] is None
    assert flips["cache_bytes_to_target"] == 80 and flips["text_bytes_to_target"] == 1000
    calls = regime_map.closest_calls(df, params)
    assert calls == {(0, "recall", 512, 1000): ["kv:front:int8", "text:raw"]}


def test_the_flip_cap_is_where_the_sign_changes():
    df = pd.DataFrame(rows("kv:front:int8", 100, [0] * 10, 90) + rows("text:raw", 100, [1] * 10, 100)
                      + rows("kv:front:int8", 1000, [1] * 10, 900) + rows("text:raw", 1000, [0] * 10, 1000))
    params = smoke(bootstrap=100, pairs="[p]")
    table = regime_map.regime_table(df, params)
    assert list(table["winner"]) == ["text", "cache"]
    assert regime_map.flips(table, df, params).iloc[0]["flip_cap"] == 1000
    macros = regime_map.macros(table, regime_map.flips(table, df, params), params)
    assert macros["figEightPRecallCtxFiveOneTwoFlipCap"] == "1000"


def test_a_tie_is_no_flip_and_a_change_of_leader_is():
    tie_then_text = (rows("kv:front:int8", 100, [0] * 10, 90) + rows("text:raw", 100, [0] * 10, 100)
                     + rows("kv:front:int8", 1000, [0] * 10, 900) + rows("text:raw", 1000, [1] * 10, 1000))
    cache_tie_text = (rows("kv:front:int8", 100, [1] * 10, 90) + rows("text:raw", 100, [0] * 10, 100)
                      + rows("kv:front:int8", 1000, [1] * 10, 900) + rows("text:raw", 1000, [1] * 10, 1000)
                      + rows("kv:front:int8", 5000, [0] * 10, 900) + rows("text:raw", 5000, [1] * 10, 1000))
    params = smoke(bootstrap=100, pairs="[p]")
    for data, flip in ((tie_then_text, "none"), (cache_tie_text, "5000")):
        df = pd.DataFrame(data)
        table = regime_map.regime_table(df, params)
        macros = regime_map.macros(table, regime_map.flips(table, df, params), params)
        assert macros["figEightPRecallCtxFiveOneTwoFlipCap"] == flip


def test_bytes_to_target_takes_any_method_of_a_side_and_few_items_win_nothing():
    df = pd.DataFrame(rows("kv:front:int8", 1000, [1] * 10, 900) + rows("rd:vnorm:int4+int8", 1000, [1] * 6 + [0] * 4, 300)
                      + rows("text:raw", 1000, [0] * 10, 1000))
    params = smoke(bootstrap=100, pairs="[p]", target_accuracy=0.6)
    table = regime_map.regime_table(df, params)
    assert table.iloc[0]["cache_method"] == "kv:front:int8"
    assert regime_map.flips(table, df, params).iloc[0]["cache_bytes_to_target"] == 300
    few = pd.DataFrame(rows("kv:front:int8", 100, [1, 1, 1, 0, 0, 0], 90) + rows("text:raw", 100, [0] * 6, 100))
    table = regime_map.regime_table(few, params)  # 3 of 6 discordant items: exact p = 0.25, no winner
    assert table.iloc[0]["diff_low"] > 0 and table.iloc[0]["p_value"] == pytest.approx(0.25)
    assert table.iloc[0]["winner"] == "tie"
    assert regime_map.exact_mcnemar(np.ones(10), np.zeros(10)) == pytest.approx(2 / 1024)


def test_extraction_through_the_sweep_with_the_why_panel_and_the_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    params = smoke(tasks="[extraction]", buckets="[192]", caps="[0,2048]", stability_shards=0)
    df, provenance = regime_map.run(params, progress=False)
    assert provenance["filler"] == FILLER_VERSION and set(df["task"]) == {"extraction"}
    assert (df["bytes"] <= df["cap"].fillna(float("inf"))).all()  # cap 0 sends nothing, never more
    assert (df[df["cap"] == 0]["bytes"] == 0).all()
    table = regime_map.regime_table(df, params)
    why = regime_map.why(df, table)
    sections = ["bytes_header", "bytes_indices", "bytes_map", "bytes_payload", "bytes_scales", "bytes_checksum"]
    sent = why[why["cap"].isna()]
    assert (sent[sections].sum(axis=1) > 0).all() and sent["tokens_kept"].eq(1.0).all()
    from ember.plotting import regime_map as plot

    fig = plot(table, why, "extraction")
    assert len(fig.axes) >= 3


def test_configs_and_tokenizers_load_without_weights(tmp_path, tiny_dirs):
    from ember.errors import ModelLoadError
    from ember.models.loader import load_config, load_spec_tokenizer
    from ember.models.presets import PRESETS

    assert load_config("tiny-qwen2") == PRESETS["tiny-qwen2"]
    assert isinstance(load_spec_tokenizer("tiny-qwen2"), CharTokenizer)
    assert load_config(str(tiny_dirs["tiny-qwen3"])).num_layers == PRESETS["tiny-qwen3"].num_layers
    with pytest.raises(ModelLoadError, match="config.json"):
        load_config(str(tmp_path))
