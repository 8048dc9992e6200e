"""Model loading: presets, HF directories, clear errors for what the decoder cannot run."""

import json

import pytest
import torch

from ember.engine import KVCache
from ember.errors import GenerationError, ModelLoadError, UnsupportedModelError
from ember.models import PRESETS, ModelConfig, load, save_pretrained


def test_presets_are_seeded_and_marked_random():
    a, b, c = load("tiny-qwen3", seed=1), load("tiny-qwen3", seed=1), load("tiny-qwen3", seed=2)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(a.model(ids), b.model(ids))
    assert not torch.equal(a.model(ids), c.model(ids))
    assert a.provenance["random_weights"] is True and a.provenance["source"] == "preset"


@pytest.mark.parametrize("name, params", [("qwen3-0.6b", 0.596e9), ("qwen3-4b", 4.02e9), ("qwen2.5-0.5b", 0.494e9)])
def test_shape_presets_have_the_real_parameter_counts(name, params):
    with torch.device("meta"):
        from ember.models import DecoderLM

        model = DecoderLM(PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)


def test_directory_round_trip_in_bf16(tmp_path):
    loaded = load("tiny-llama")
    save_pretrained(loaded, tmp_path / "m")
    again = load(str(tmp_path / "m"), dtype="bf16")
    assert again.model.output_weight.dtype == torch.bfloat16
    assert again.provenance["source"] == "local" and again.provenance["random_weights"] is False
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(again.model(ids).float(), loaded.model(ids), atol=0.3, rtol=0.05)


def test_missing_weights_are_named(tmp_path):
    save_pretrained(load("tiny-llama"), tmp_path / "m")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing \\['model.norm.weight'\\]"):
        load(str(tmp_path / "m"))


def test_corrupt_weights_file_is_a_load_error(tmp_path):
    save_pretrained(load("tiny-llama"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load(str(tmp_path / "m"))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope type"),
])
def test_unsupported_configs_are_refused(change, message):
    hf = PRESETS["tiny-llama"].to_hf()
    hf.update(change)
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf(hf)


def test_transformers_v5_rope_parameters_are_read():
    hf = PRESETS["tiny-qwen3"].to_hf()
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    assert ModelConfig.from_hf(hf).rope_theta == 1234.0


def test_bad_specs_say_what_was_expected(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="expected a preset"):
        load("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="expected config.json"):
        load(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub id 'nobody/nothing'"):
        load("nobody/nothing")
    with pytest.raises(ModelLoadError, match="dtype"):
        load("tiny-llama", dtype="int3")


def test_failed_save_leaves_no_partial_directory(tmp_path, monkeypatch):
    loaded = load("tiny-llama")
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_pretrained(loaded, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_cache_refuses_overflow_and_bad_groups():
    config = PRESETS["tiny-llama"]
    cache = KVCache(config, batch=4, capacity=3, dtype=torch.float32, device="cpu")
    with pytest.raises(GenerationError, match="does not divide"):
        cache.reserve(3, 1)
    cache.reserve(2, 3)
    assert cache.next_position.tolist() == [3, 3, 3, 3]
    with pytest.raises(GenerationError, match="cache overflow"):
        cache.reserve(4, 1)
    assert json.dumps(config.to_hf())  # serializable


def test_next_position_follows_the_last_real_position_whatever_the_mask():
    config = PRESETS["tiny-llama"]
    for valid in (None, torch.ones(1, 2, dtype=torch.bool)):
        cache = KVCache(config, batch=1, capacity=8, dtype=torch.float32, device="cpu")
        cache.next_position.fill_(5)
        cache.reserve(1, 2, valid, positions=torch.tensor([[1, 3]]))  # explicit positions behind the cursor
        assert cache.next_position.tolist() == [5]  # never moves backwards
        cache.reserve(1, 2, valid, positions=torch.tensor([[9, 7]]))
        assert cache.next_position.tolist() == [10]  # one past the largest position, not the last column


def test_nested_stages_are_counted_once():
    import time

    from ember.engine.timers import StageTimer

    timer = StageTimer("cpu")
    with timer.stage("prefill"):
        time.sleep(0.01)
        with timer.stage("capture"):
            time.sleep(0.3)
    try:
        with timer.stage("decode"):
            raise KeyboardInterrupt  # a stage that fails is still timed, and totals still add up
    except KeyboardInterrupt:
        pass
    totals = timer.totals()
    assert 0.01 <= totals["prefill"] < 0.2 and totals["capture"] >= 0.3 and totals["decode"] >= 0
    assert totals == timer.totals()
