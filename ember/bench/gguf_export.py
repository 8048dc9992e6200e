"""Write ember's weights as a GGUF that llama.cpp reads, in F32 or F16, so a llama.cpp row of tab2 runs on the
very weights of the ember row and in its dtype (package weights are bf16 values: F32 holds them exactly, F16
does at weight magnitudes, and the writer checks that it does).

The metadata (architecture hyperparameters, tokenizer, chat template) is copied from the package's source GGUF;
the tensors come from ember's safetensors, renamed to llama.cpp's names. llama-architecture models store Q and K
with their rotary halves interleaved, so those two are permuted back the way llama.cpp's converter does (and the
transformers GGUF loader undoes): reading the file back with transformers gives ember's weights exactly (test).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ember.errors import ModelLoadError

FILE_TYPES = {"f32": 0, "f16": 1}  # llama.cpp's file type codes: all tensors F32 / 2-D tensors in F16
MATRIX_DTYPES = {"f32": np.float32, "f16": np.float16}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def ember_name(gguf_name: str) -> str:
    """The safetensors name of a llama.cpp tensor name (raises ModelLoadError for one ember has no twin of)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r}: expected one of the llama/qwen2/qwen3 decoder tensors")


def interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Q or K projection (heads * D, hidden) from rotate-half order to llama.cpp's interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_folder: Path, source_gguf: Path, out: Path, kind: str = "f16") -> Path:
    """A GGUF at `out` holding the safetensors weights of `model_folder` (matrices in `kind`, 'f32' or 'f16';
    vectors in F32) and the metadata of `source_gguf` (the package GGUF the folder was converted from). A weight
    F16 cannot hold exactly raises ModelLoadError (write 'f32' then). Written to a temporary file, then renamed."""
    import gguf

    if kind not in FILE_TYPES:
        raise ModelLoadError(f"GGUF kind: expected one of {sorted(FILE_TYPES)}, found {kind!r}")
    reader = gguf.GGUFReader(str(source_gguf))
    architecture = reader.fields["general.architecture"].contents()
    state = load_file(str(Path(model_folder) / "model.safetensors"))
    heads = int(reader.fields[f"{architecture}.attention.head_count"].contents())
    kv_heads = int(reader.fields[f"{architecture}.attention.head_count_kv"].contents())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(str(partial), architecture)
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.file_type") or field.name.startswith("GGUF."):
            continue  # the writer adds these itself (the file type is this file's own)
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(FILE_TYPES[kind])
    for tensor in reader.tensors:
        name = ember_name(tensor.name)
        if name not in state:
            raise ModelLoadError(f"{model_folder}: expected tensor {name} (GGUF {tensor.name}), found none")
        weight = state[name].to(torch.float32).numpy()  # (out, in) or (n,)
        if architecture == "llama" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            weight = interleave_rotary(weight, heads if "attn_q" in tensor.name else kv_heads)
        with np.errstate(over="ignore"):  # an overflow is caught by the exactness check below
            stored = weight.astype(MATRIX_DTYPES[kind] if weight.ndim == 2 else np.float32)
        if not np.array_equal(stored.astype(np.float32), weight):
            raise ModelLoadError(f"{model_folder}: {name} has values {kind.upper()} does not hold exactly (beyond "
                                 f"its range or precision); write an 'f32' GGUF")
        writer.add_tensor(tensor.name, stored)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out
