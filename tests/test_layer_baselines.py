"""tab3's layer-wise baselines: the layer-group wire container, per-layer bytes, the KVComm-like and
Q-KVComm-like encoders against full transfers they must equal, their calibration, and the tab3 sweep."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from ember.comm.harness import Harness, parse_method
from ember.comm.items import comm_items
from ember.comm.layer_baselines import (KVCommMethod, QKVCommMethod, attention_mass, encode_kvcomm, encode_qkvcomm,
                                        layer_scores, sensitivity)
from ember.comm.messages import SharerSide, StoredMessages
from ember.comm.transfer import KVMethod, encode_context, receive
from ember.engine import Engine
from ember.errors import CommError, KVWireError, ParamsError
from ember.experiments import equal_bytes
from ember.kv.layered import assemble, breakdown, is_layered, pack_groups, unpack_groups
from ember.kv.wire import KVPayload, WireConfig, expected_size, inspect, layer_bytes, pack, unpack
from ember.params import load_params


@pytest.fixture(scope="module")
def tiny():
    return Engine.load("tiny-qwen2", progress=False, prefix_cache=False)


def random_kv(layers=4, heads=2, tokens=6, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, heads, tokens, dim, generator=generator)  # (L, 2, H, c, D)


# ---- the wire ----------------------------------------------------------------------------------------------

def test_layer_groups_round_trip_count_every_byte_and_refuse_damage():
    kv = random_kv()
    full, rest = [1, 2], [0, 3]
    groups = [(full, KVPayload(kv[full, 0], kv[full, 1], torch.arange(6), 6)),
              (rest, KVPayload(kv[rest, 0][:, :, :1], kv[rest, 1][:, :, :1], torch.tensor([0]), 6))]
    message = pack_groups(groups, WireConfig("fp16"), 4)
    assert is_layered(message) and not is_layered(pack(groups[0][1], WireConfig("fp16")))
    parts = breakdown(message)
    assert sum(v for k, v in parts.items() if k not in ("total", "stored_body")) == parts["total"] == len(message)
    layers, decoded = unpack_groups(message)
    merged, positions, visible = assemble(layers, decoded)
    assert positions.tolist() == list(range(6))
    assert visible[full].all() and visible[rest, 0].all() and not visible[rest, 1:].any()
    assert torch.equal(merged[full], kv[full].half())
    assert torch.equal(merged[rest][:, :, :, :1], kv[rest][:, :, :, :1].half())
    damaged = bytearray(message)
    damaged[20] ^= 1
    with pytest.raises(KVWireError, match="CRC"):
        unpack_groups(bytes(damaged))
    with pytest.raises(KVWireError, match="one group"):
        pack_groups([groups[0], ([2, 3], groups[1][1])], WireConfig("fp16"), 4)
    with pytest.raises(KVWireError, match="ascending"):
        pack_groups([([2, 1], groups[0][1])], WireConfig("fp16"), 4)
    with pytest.raises(KVWireError, match="context length"):
        pack_groups([groups[0], (rest, KVPayload(kv[rest, 0], kv[rest, 1], torch.arange(6), 7))], WireConfig("fp16"), 4)
    for bad, match in ((message[:10], "at least"), (b"KVWX" + message[4:], "magic"),
                       (message[:-5] + message[-4:], "CRC|fit|blobs")):
        with pytest.raises(KVWireError, match=match):
            unpack_groups(bad)
    remapped = bytearray(message[:-4])
    remapped[12] = 7  # layer 0 in a group that does not exist
    with pytest.raises(KVWireError, match="layer map"):
        unpack_groups(bytes(remapped) + zlib.crc32(bytes(remapped)).to_bytes(4, "little"))


def test_layer_bytes_add_up_to_payload_and_scales():
    kv = random_kv()
    maps = {"token": KVPayload(kv[:, 0], kv[:, 1], torch.arange(6), 6,
                               token_precision=torch.tensor([2, 3, 2, 3, 3, 1], dtype=torch.uint8)),
            "layer": KVPayload(kv[:, 0], kv[:, 1], torch.arange(6), 6,
                               layer_precision=torch.tensor([2, 3, 3, 2], dtype=torch.uint8))}
    for payload in maps.values():
        config = WireConfig("int4", "token")
        per_layer = layer_bytes(payload, config)
        parts = inspect(pack(payload, config)).breakdown
        assert sum(per_layer) == parts["payload"] + parts["scales"]
    heavy = layer_bytes(maps["layer"], WireConfig("int4", "token"))
    assert heavy[0] == heavy[3] > heavy[1] == heavy[2]  # int8 layers weigh more


# ---- KVComm-like ---------------------------------------------------------------------------------------------

def test_kvcomm_sends_the_best_layers_that_fit_and_nothing_when_none_does():
    kv = random_kv()
    scores = np.array([0.1, 0.9, 0.5, 0.2])
    everything = encode_kvcomm(kv, KVCommMethod("int8"), None, scores)
    assert everything.extra == {"layers_full": 4} and everything.nbytes == len(everything.blob)
    two = encode_kvcomm(kv, KVCommMethod("int8"), everything.nbytes - 1, scores)
    assert two.nbytes <= everything.nbytes - 1 and two.extra["layers_full"] == 3
    _, decoded = unpack_groups(two.blob)
    assert decoded[0][0] == [1, 2, 3] and decoded[1][0] == [0]  # layer 0 scores lowest: first token only
    assert sum(two.layer_bytes) == two.breakdown["payload"] + two.breakdown["scales"]
    assert encode_kvcomm(kv, KVCommMethod("int8"), 40, scores).blob is None
    with pytest.raises(CommError, match="kvcomm precision"):
        KVCommMethod("nf4")


def test_kvcomm_of_every_layer_equals_a_full_fp16_transfer(tiny):
    item = comm_items("recall", 1, 0, facts=3)[0]
    side = SharerSide(tiny, calibration=comm_items("recall", 2, 100, facts=3))
    sent = side.encode(item, KVCommMethod("fp16"), None, 3)
    plain = side.encode(item, KVMethod("front", ("fp16",)), None, 3)
    assert sent.encoded.extra["layers_full"] == tiny.model.config.num_layers
    head = tiny.prefill_kv([1, 2, 3], use_prefix_cache=False)[0]
    layered, _, _ = receive(sent.encoded.blob, head, sent.context_tokens, "cpu", torch.float32)
    reference, _, _ = receive(plain.encoded.blob, head, plain.context_tokens, "cpu", torch.float32)
    assert torch.equal(layered.kv, reference.kv) and layered.layer_valid.all()
    with pytest.raises(CommError, match="same-model"):
        receive(sent.encoded.blob, head, sent.context_tokens, "cpu", torch.float32, projector=lambda *a: a)
    with pytest.raises(CommError, match="layers, KV heads, head dim"):
        receive(plain.encoded.blob, head[:1], plain.context_tokens, "cpu", torch.float32)


def test_kvcomm_receiver_sees_only_the_first_token_in_unselected_layers(tiny):
    item = comm_items("recall", 1, 0, facts=3)[0]
    side = SharerSide(tiny, calibration=comm_items("recall", 2, 100, facts=3))
    full = side.encode(item, KVCommMethod("int8"), None, 3).encoded.nbytes
    sent = side.encode(item, KVCommMethod("int8"), full - 1, 3)
    chosen = sent.encoded.extra["layers_full"]
    assert 0 < chosen < tiny.model.config.num_layers and sent.encoded.nbytes < full
    head = tiny.prefill_kv([1, 2, 3], use_prefix_cache=False)[0]
    past, _, _ = receive(sent.encoded.blob, head, sent.context_tokens, "cpu", torch.float32)
    seen = past.layer_valid[:, 3:]  # (L, context tokens)
    assert int(seen.all(dim=1).sum()) == chosen and seen[:, 0].all()
    assert int((~seen).sum()) == (tiny.model.config.num_layers - chosen) * (sent.context_tokens - 1)
    harness = Harness(tiny, tiny, [item], max_tokens=3, progress=False,
                      calibration=comm_items("recall", 2, 100, facts=3))
    rows = harness.run(["kvcomm:int8", "qkvcomm:knorm"], [full - 1])
    assert all(r["bytes"] < full for r in rows) and {"layers_full", "layers_int8"} <= set(rows[0]) | set(rows[1])


def test_calibration_ranks_layers_from_attention_and_the_prior(tiny):
    items = comm_items("recall", 2, 100, facts=3)
    mass = attention_mass(tiny, items)
    assert mass.shape == (tiny.model.config.num_layers,) and ((mass >= 0) & (mass <= 1 + 1e-6)).all()
    assert mass == pytest.approx(np.mean([reference_mass(tiny, item) for item in items], axis=0), abs=1e-5)
    flat = layer_scores(np.full(9, 0.3))
    assert flat.argmax() == 4 and flat[0] == pytest.approx(flat[8])  # the prior alone: the middle layer wins
    with pytest.raises(CommError, match="calibration"):
        SharerSide(tiny).encode(comm_items("recall", 1, 0, facts=3)[0], KVCommMethod("int8"), None, 3)


def reference_mass(engine, item) -> np.ndarray:
    """The attention mass question tokens put on context tokens, from probabilities checked to reproduce each
    layer's attention output (probs @ V equals o_proj's input): query head h reads KV head h // group."""
    from ember.comm.prompt import prompt_parts
    from ember.models.step import causal_step

    parts = prompt_parts(engine.tokenizer, item.context, item.question)
    ids = torch.tensor([parts.full])
    seen, outputs = {}, {}
    model = engine.model

    def keep_kv(layer, k, v):
        seen[layer] = (k, v)
        return k, v

    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda module, args, i=i: outputs.__setitem__(i, args[0])) for i, layer in enumerate(model.model.layers)]
    queries = {}
    with torch.no_grad():
        model.run(causal_step(tuple(ids.shape), kv_hook=keep_kv,
                              query_hook=lambda layer, q, keys, mask: queries.__setitem__(layer, q)), input_ids=ids)
    for hook in hooks:
        hook.remove()
    heads, tokens = model.config.num_heads, ids.shape[1]
    group = heads // model.config.num_kv_heads
    start, stop = len(parts.head), len(parts.head) + len(parts.context)
    out = []
    for layer in range(model.config.num_layers):
        k, v = seen[layer]
        probs = torch.zeros(heads, tokens, tokens)
        attended = torch.zeros(heads, tokens, v.shape[-1])
        for h in range(heads):
            logits = queries[layer][0, h] @ k[0, h // group].T / k.shape[-1] ** 0.5  # (T, T)
            logits = logits.masked_fill(torch.ones(tokens, tokens, dtype=torch.bool).triu(1), float("-inf"))
            probs[h] = logits.softmax(-1)
            attended[h] = probs[h] @ v[0, h // group]
        assert torch.allclose(attended.transpose(0, 1).reshape(tokens, -1), outputs[layer][0], atol=1e-5)
        out.append(float(probs[:, stop:, start:stop].sum(-1).mean()))
    return np.array(out)


# ---- Q-KVComm-like -------------------------------------------------------------------------------------------

def test_qkvcomm_with_room_for_int8_everywhere_equals_int8_full_transfer():
    kv = random_kv()
    rich = encode_qkvcomm(kv, QKVCommMethod("vnorm"), None)
    assert rich.extra == {"layers_int8": 4} and rich.groups == ["int8"] * 6
    reference = encode_context(kv, KVMethod("front", ("int8",)), None)
    assert rich.blob == reference.blob  # one precision everywhere: no map, the very same bytes
    mixed = encode_qkvcomm(kv, QKVCommMethod("vnorm"), rich.nbytes - 1)
    assert 0 < mixed.extra["layers_int8"] < 4 and set(mixed.groups) == {"int4"}  # a token's lowest precision
    assert unpack(mixed.blob).layer_precision is not None


def test_qkvcomm_upgrades_the_most_sensitive_layers_first_and_drops_tokens_last():
    kv = random_kv(tokens=12)
    kv[2, :, :, :, 0] *= 50  # layer 2: one outlier channel, int4 loses its small values
    order = np.argsort(-sensitivity(kv), kind="stable")
    assert len(set(sensitivity(kv).round(6))) == 4
    full_size = encode_qkvcomm(kv, QKVCommMethod("vnorm"), None).nbytes  # every layer at int8
    upgraded = []
    for cap in range(full_size // 4, full_size + 1, full_size // 16):
        sent = encode_qkvcomm(kv, QKVCommMethod("vnorm"), cap)
        assert sent.nbytes <= cap
        upgraded.append(sent.extra["layers_int8"])
        if sent.extra["layers_int8"]:
            payload = unpack(sent.blob)
            int8 = set(torch.nonzero(payload.layer_precision == 2)[:, 0].tolist())
            assert int8 == set(order[:sent.extra["layers_int8"]].tolist())  # the most sensitive first
            if sent.tokens_sent < 12:  # layers go to int8 only in slack one more int4 token would not fit in
                int4_map = torch.full((4,), 3, dtype=torch.uint8)
                assert expected_size(WireConfig("int4", "token"), 4, 2, 8, sent.tokens_sent + 1,
                                     layer_precision=int4_map, max_position=11) > cap
    assert upgraded == sorted(upgraded) and max(upgraded) > 0 and min(upgraded) == 0
    assert encode_qkvcomm(kv, QKVCommMethod("vnorm"), 30).blob is None


def test_layer_methods_parse_and_are_checked():
    assert parse_method("kvcomm:int8") == KVCommMethod("int8")
    assert parse_method("qkvcomm:knorm") == QKVCommMethod("knorm")
    for bad in ("kvcomm:", "kvcomm:int8:x", "qkvcomm:proj_vnorm"):
        with pytest.raises(CommError):
            parse_method(bad)


def test_stored_layer_messages_equal_live_ones(tiny, tmp_path):
    item = comm_items("recall", 1, 0, facts=3)[0]
    calibration = comm_items("recall", 2, 100, facts=3)
    live = SharerSide(tiny, calibration=calibration)
    stored = StoredMessages(tmp_path, SharerSide(tiny, calibration=calibration))
    for method in (KVCommMethod("int8"), QKVCommMethod("vnorm")):
        for cap in (4096, None):
            expected = live.encode(item, method, cap, 3).encoded
            stored.encode(item, method, cap, 3)
            again = StoredMessages(tmp_path).encode(item, method, cap, 3).encoded
            assert again.blob == expected.blob and again.layer_bytes == expected.layer_bytes
            assert again.extra == expected.extra


# ---- tab3 ----------------------------------------------------------------------------------------------------

def test_tab3_smoke_sweep_table_macros_and_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    params = load_params("tab3", "smoke", "")
    df, provenance = equal_bytes.run(params, progress=False)
    assert provenance["device"] == "cpu"  # the manifest's device block comes from it
    assert {"kvcomm", "qkvcomm", "cache", "text"} <= set(df["method"].map(equal_bytes.regime_map.family))
    assert (df["bytes"] <= df["cap"].fillna(float("inf"))).all()
    table = equal_bytes.head_to_head(df)
    assert len(table) == len(params.caps) + 1  # every cap and full transfer
    assert set(table["leader"]) <= set(equal_bytes.SIDES)
    for side in equal_bytes.SIDES:
        assert table[f"{side}_accuracy"].between(0, 1).all()
        assert (table[f"{side}_ci_low"] <= table[f"{side}_accuracy"]).all()
    latex = equal_bytes.latex_table(table)
    assert "KVComm-like" in latex and "\\begin{tabular}" in latex
    assert "%" not in latex.replace("\\%", "")  # a bare % would comment out the rest of a LaTeX line
    values = equal_bytes.macros(table, params)
    assert sum(v for k, v in values.items() if k.endswith("Leads")) == len(params.caps)  # finite caps
    from ember.plotting import equal_bytes as plot

    assert len(plot(table, "smoke").axes) == 1
    perfect = table.assign(text_accuracy=1.0, text_ci_low=0.6, text_ci_high=1 - 1e-16)  # Wilson's bound rounds below 1
    assert len(plot(perfect, "all right").axes) == 1
    sequential = df.sort_values(["method", "cap", "item_id"]).reset_index(drop=True)
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "sim"))
    simultaneous, _ = equal_bytes.run(load_params("tab3", "smoke", "sequential=false"), progress=False)
    simultaneous = simultaneous.sort_values(["method", "cap", "item_id"]).reset_index(drop=True)
    for column in ("correct", "bytes", "output", "layer_bytes"):
        pd.testing.assert_series_equal(sequential[column], simultaneous[column], check_dtype=False)


def test_tab3_params_need_both_baselines():
    with pytest.raises(ParamsError, match="kvcomm"):
        load_params("tab3", "smoke", "methods=[alone,text:raw,kv:front:int8,qkvcomm:vnorm]")
