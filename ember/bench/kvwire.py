"""Benchmark: KVWire encode / decode throughput (GB/s of fp16 KV) and bytes per token per scheme.

The floor is a plain dtype-cast copy of the same data (`tensor.to(torch.int8)`): no scales, no layout.

  python -m ember.cli bench kvwire --layers 28 --heads 8 --head-dim 128 --tokens 4096 --out kvwire.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ember.engine.timers import median_seconds
from ember.experiments.workloads import resolve_device
from ember.kv.wire import KVPayload, WireConfig, expected_size, pack, unpack
from ember.report import atomic_write, run_manifest

THROUGHPUT = {"int8/head": WireConfig("int8", "head"), "int4/token": WireConfig("int4", "token", block_tokens=1)}
SIZES = {
    "fp16": WireConfig("fp16"),
    "int8/head": WireConfig("int8", "head"),
    "int8/token": WireConfig("int8", "token"),
    "int8/kivi": WireConfig("int8", "kivi"),
    "int4/token": WireConfig("int4", "token"),
    "int4/token32-asym": WireConfig("int4", "token", block_tokens=32, symmetric=False),
    "int4/kivi": WireConfig("int4", "kivi"),
    "nf4/token": WireConfig("nf4", "token"),
    "fp8/head": WireConfig("fp8", "head"),
}


def run(layers: int, heads: int, head_dim: int, tokens: int, device: str, repeats: int, seed: int = 0) -> dict:
    device = torch.device(resolve_device(device))
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (layers, heads, tokens, head_dim)
    k = torch.randn(shape, generator=generator, device=device).half()  # (L, H, T, D)
    v = torch.randn(shape, generator=generator, device=device).half()
    payload = KVPayload(k, v, torch.arange(tokens), tokens)
    fp16_bytes = 2 * k.numel() * 2
    params = {"layers": layers, "heads": heads, "head_dim": head_dim, "tokens": tokens, "repeats": repeats,
              "seed": seed}
    report = run_manifest("bench-kvwire", params, {"source": "random", "seed": seed}, str(device), extra={
        "fp16_bytes": fp16_bytes, "fp16_bytes_per_token": fp16_bytes // tokens, "throughput": {},
        "bytes_per_token": {}})
    floor = median_seconds(lambda: (k.to(torch.int8), v.to(torch.int8)), device, repeats, warmup=1)
    report["throughput"]["floor_cast_copy"] = {"seconds": floor, "gb_per_s": fp16_bytes / floor / 1e9}
    for name, config in THROUGHPUT.items():
        blob = pack(payload, config)
        encode = median_seconds(lambda: pack(payload, config), device, repeats, warmup=1)
        decode = median_seconds(lambda: unpack(blob, device=device), device, repeats, warmup=1)
        report["throughput"][name] = {"encode_s": encode, "decode_s": decode, "blob_bytes": len(blob),
                                      "encode_gb_per_s": fp16_bytes / encode / 1e9,
                                      "decode_gb_per_s": fp16_bytes / decode / 1e9}
        print(name, json.dumps(report["throughput"][name]), flush=True)
    for name, config in SIZES.items():
        size = expected_size(config, layers, heads, head_dim, tokens)
        report["bytes_per_token"][name] = {"blob_bytes": size, "bytes_per_token": size / tokens,
                                           "ratio_vs_fp16": fp16_bytes / size}
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ember bench kvwire", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=8, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="reports/bench/kvwire.json")
    args = parser.parse_args(argv)
    report = run(args.layers, args.heads, args.head_dim, args.tokens, args.device, args.repeats)
    atomic_write(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
