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


def _edit_config(directory, edit):
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    edit(hf)
    path.write_text(json.dumps(hf))


@pytest.mark.parametrize("edit, message", [
    (lambda hf: hf.pop("hidden_size"), "config.json: hidden_size: expected a positive integer, found no such field"),
    (lambda hf: hf.update(num_key_value_heads=0), "num_key_value_heads: expected a positive integer, found 0"),
    (lambda hf: hf.update(num_attention_heads=0), "num_attention_heads: expected a positive integer, found 0"),
    (lambda hf: hf.update(vocab_size="32"), "vocab_size: expected a positive integer, found '32'"),
    (lambda hf: hf.update(rms_norm_eps="tiny"), "rms_norm_eps: expected a positive number, found 'tiny'"),
    (lambda hf: hf.update(num_hidden_layers=2.0), "num_hidden_layers: expected a positive integer, found 2.0"),
    (lambda hf: hf.update(tie_word_embeddings="yes"), "tie_word_embeddings: expected true or false, found 'yes'"),
    (lambda hf: hf.update(eos_token_id="</s>"), "eos_token_id: expected a non-negative integer"),
    (lambda hf: hf.update(rope_scaling="linear"), "rope_parameters / rope_scaling: expected an object"),
    (lambda hf: hf.update(num_key_value_heads=3), "config.json: num_heads \\(4\\) must be a multiple"),
], ids=["missing", "zero-kv-heads", "zero-heads", "str-int", "str-float", "float-int", "str-bool", "str-eos",
        "str-rope", "indivisible-heads"])
def test_bad_config_fields_are_named(tmp_path, edit, message):
    """Hardening #11: a missing field, zero KV heads or a string for a number raised KeyError / ZeroDivisionError /
    TypeError; each is a ModelLoadError naming config.json and the field."""
    save_pretrained(load("tiny-llama"), tmp_path / "m")
    _edit_config(tmp_path / "m", edit)
    with pytest.raises(ModelLoadError, match=message):
        load(str(tmp_path / "m"))


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_malformed_json_is_a_load_error(tmp_path, name):
    save_pretrained(load("tiny-llama"), tmp_path / "m")
    (tmp_path / "m" / name).write_text('{"model_type": "llama",')
    with pytest.raises(ModelLoadError, match=f"{name}: expected valid JSON, found JSONDecodeError"):
        load(str(tmp_path / "m"))
    (tmp_path / "m" / name).write_text('["llama"]')
    if name == "config.json":
        with pytest.raises(ModelLoadError, match="config.json: expected a JSON object, found list"):
            load(str(tmp_path / "m"))


def test_config_that_disagrees_with_the_weights_names_the_tensor(tmp_path):
    """Hardening #11: torch's size-mismatch list becomes one line naming the file, the tensor and both shapes."""
    save_pretrained(load("tiny-llama"), tmp_path / "m")
    _edit_config(tmp_path / "m", lambda hf: hf.update(intermediate_size=hf["intermediate_size"] * 2))
    with pytest.raises(ModelLoadError, match="model.safetensors: tensor model.layers.0.mlp.gate_proj.weight: "
                                             "expected shape \\(256, 64\\) .*found \\(128, 64\\) \\(5 more"):
        load(str(tmp_path / "m"))


def _shard(directory, names_per_file: dict[str, list[str]]):
    """Split model.safetensors into the given files and write the index that maps each tensor to its file."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    weight_map = {}
    for file, names in names_per_file.items():
        save_file({n: state[n] for n in names}, str(directory / file))
        weight_map.update({n: file for n in names})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_shards_come_from_the_index_and_extra_files_are_errors(tmp_path):
    """Hardening #11: a stray extra *.safetensors file silently overrode weights; shards follow the index."""
    from safetensors.torch import save_file

    loaded = load("tiny-llama")
    save_pretrained(loaded, tmp_path / "m")
    names = sorted(loaded.model.state_dict())
    state = _shard(tmp_path / "m", {"a.safetensors": names[::2], "b.safetensors": names[1::2]})
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(load(str(tmp_path / "m")).model(ids), loaded.model(ids))
    stray = {names[0]: torch.zeros_like(state[names[0]])}
    save_file(stray, str(tmp_path / "m" / "zz-stray.safetensors"))
    with pytest.raises(ModelLoadError, match="index.json: expected the shard files it lists, found missing \\[\\], "
                                             "unexpected \\['zz-stray.safetensors'\\]"):
        load(str(tmp_path / "m"))
    (tmp_path / "m" / "zz-stray.safetensors").unlink()
    (tmp_path / "m" / "b.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="found missing \\['b.safetensors'\\]"):
        load(str(tmp_path / "m"))
    save_file({**{n: state[n] for n in names[1::2]}, names[0]: state[names[0]]}, str(tmp_path / "m" / "b.safetensors"))
    with pytest.raises(ModelLoadError, match=f"b.safetensors: tensor {names[0]}: expected in one file"):
        load(str(tmp_path / "m"))


def test_several_weight_files_without_an_index_are_an_error(tmp_path):
    save_pretrained(load("tiny-llama"), tmp_path / "m")
    (tmp_path / "m" / "model-copy.safetensors").write_bytes((tmp_path / "m" / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="expected one \\*.safetensors file or model.safetensors.index.json "
                                             "naming the shards, found \\['model-copy.safetensors', 'model"):
        load(str(tmp_path / "m"))


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
