"""The dispatch report (EMBER_DEBUG_DISPATCH=1): per layer, the attention path and the LoRA path that ran; off,
nothing is recorded and nothing changes."""

from __future__ import annotations

import logging

import torch

from ember.engine import Engine, SamplingParams
from ember.engine.past import PastKV
from ember.models import LoraAdapter, dispatch, load

GREEDY = SamplingParams(temperature=0, max_tokens=3)


def test_the_report_names_each_layers_attention_and_lora_paths(monkeypatch, caplog):
    loaded = load("tiny-qwen2")
    engine = Engine(loaded.model, loaded.tokenizer, prefix_cache=False)
    plain = engine.generate(["hello there", "hi"], sampling=GREEDY)
    monkeypatch.setenv(dispatch.ENV, "1")
    with caplog.at_level(logging.INFO, logger="ember.dispatch"):
        reported = engine.generate(["hello there", "hi"], sampling=GREEDY)
    assert [o.completions[0].token_ids for o in reported.outputs] == [o.completions[0].token_ids
                                                                       for o in plain.outputs]
    lines = [r.getMessage() for r in caplog.records if r.name == "ember.dispatch"]
    assert len(lines) == 3  # a prefill and two decode steps
    layers = loaded.model.config.num_layers
    assert lines[0].startswith(f"dispatch: layers 0-{layers - 1}: attention=sdpa:") and "mask=bool" in lines[0]
    last = dispatch.last()
    assert sorted(last.paths) == list(range(layers)) and all(len(p["attention"]) == 1 for p in last.paths.values())

    adapter = LoraAdapter.create(loaded.model, r=2, alpha=4, targets=("q_proj", "v_proj"), seed=1)
    engine.set_adapter(engine.load_adapter(adapter, "a"))
    engine.generate(["hello"], sampling=SamplingParams(temperature=0, max_tokens=1))
    assert all(p["lora"] == ["unfused", "unfused"] for p in dispatch.last().paths.values())  # CPU: the reference
    assert "lora=unfused x2" in dispatch.last().summary()


def test_a_causal_prefill_and_a_layer_masked_past_are_told_apart(monkeypatch):
    loaded = load("tiny-qwen2")
    model, config = loaded.model, loaded.model.config
    monkeypatch.setenv(dispatch.ENV, "1")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    paths = [p["attention"] for p in dispatch.last().paths.values()]
    assert all(len(p) == 1 and p[0].endswith(" mask=causal") and "unknown" not in p[0] for p in paths)
    engine = Engine(model, loaded.tokenizer, prefix_cache=False)
    head = engine.prefill_kv([1, 2, 3], use_prefix_cache=False)[0]
    visible = torch.ones(config.num_layers, 3, dtype=torch.bool)
    visible[1, 1] = False  # layer 1 does not see token 1
    engine.generate([[5, 6]], sampling=SamplingParams(temperature=0, max_tokens=1),
                    past=[PastKV(head, 3, layer_valid=visible)])
    assert all(p["attention"][0].endswith("mask=bool+layer") for p in dispatch.last().paths.values())


def test_off_by_default_nothing_is_recorded(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    before = dispatch.last()
    loaded = load("tiny-qwen2")
    with torch.no_grad():
        loaded.model(torch.tensor([[1, 2, 3]]))
    assert dispatch.last() is before and not dispatch.recording_now()
    monkeypatch.setenv(dispatch.ENV, "0")
    assert not dispatch.enabled()
