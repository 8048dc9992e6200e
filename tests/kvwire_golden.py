"""Golden KVWire blobs: one per scheme, from a fixed payload. Regenerate only on purpose (a layout change):

    .venv/bin/python tests/kvwire_golden.py
"""

from pathlib import Path

import torch

from ember.kv import KVPayload, WireConfig, pack

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "kvwire"
CASES = {
    "fp16": WireConfig("fp16"),
    "int8": WireConfig("int8", "head"),
    "int8_asym_token": WireConfig("int8", "token", block_tokens=2, symmetric=False),
    "int4": WireConfig("int4", "token", block_tokens=3),
    "int4_kivi_bf16": WireConfig("int4", "kivi", scale_dtype="bf16", value_dtype="bf16"),
    "nf4": WireConfig("nf4", "head"),
    "fp8": WireConfig("fp8", "layer"),
    "mixed_map": WireConfig("int8", "tensor"),
}


def golden_payload(case: str) -> KVPayload:
    """A small deterministic payload (no RNG: values from a closed-form pattern)."""
    layers, heads, tokens, dim = 2, 2, 5, 4
    grid = torch.arange(layers * heads * tokens * dim, dtype=torch.float32).reshape(layers, heads, tokens, dim)
    k = torch.sin(grid * 0.37) * 2.0
    v = torch.cos(grid * 0.11) * 0.5 + 0.1
    positions = torch.tensor([0, 3, 4, 9, 70000 if case == "mixed_map" else 12])
    payload = KVPayload(k, v, positions, context_len=70001 if case == "mixed_map" else 16)
    if case == "mixed_map":
        payload.token_precision = torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8)
        payload.layer_precision = torch.tensor([0, 3], dtype=torch.uint8)
    return payload


def golden_blob(case: str) -> bytes:
    return pack(golden_payload(case), CASES[case])


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        (FIXTURES / f"{name}.kvw").write_bytes(golden_blob(name))
        print(name, len(golden_blob(name)))
