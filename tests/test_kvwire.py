"""KVWire v1: golden blobs, round trips against fake-quant, exact sizes, error bounds, hostile input."""

import random
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.errors import KVWireError
from ember.kv import KVPayload, QuantSpec, WireConfig, expected_size, fake_quant, inspect, pack, unpack
from ember.kv.quant import dequantize, error_bound, pack_nibbles, quantize, unpack_nibbles
from ember.kv.wire import HEADER
from kvwire_golden import CASES, FIXTURES, golden_blob, golden_payload

SCHEMES = ["fp16", "int8", "int4", "nf4", "fp8"]
GRANULARITIES = ["tensor", "layer", "head", "token", "kivi"]


def _refresh_crc(blob: bytes) -> bytes:
    body = blob[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _payload(layers=2, heads=3, tokens=11, dim=8, seed=0, context=None):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, heads, tokens, dim, generator=g)
    v = torch.randn(layers, heads, tokens, dim, generator=g) * 2 + 0.3
    positions = torch.sort(torch.randperm(context or 4 * tokens, generator=g)[:tokens]).values
    return KVPayload(k, v, positions, context or 4 * tokens)


def test_header_is_64_bytes():
    assert HEADER.size == 64


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_blobs_are_stable(case):
    stored = (FIXTURES / f"{case}.kvw").read_bytes()
    assert golden_blob(case) == stored, f"KVWire layout of {case!r} changed; regenerate only on purpose"
    decoded = unpack(stored)
    payload = golden_payload(case)
    assert torch.equal(decoded.positions, payload.positions)
    assert inspect(stored).checksum_ok


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_wire_equals_fake_quant_and_expected_size(scheme, granularity):
    payload = _payload()
    config = WireConfig(scheme, granularity, block_tokens=4)
    blob = pack(payload, config)
    assert len(blob) == expected_size(config, 2, 3, 8, 11, max_position=int(payload.positions[-1]))
    out = unpack(blob)
    spec = config.spec(scheme)
    assert torch.equal(out.k, fake_quant(payload.k, spec, "k"))
    assert torch.equal(out.v, fake_quant(payload.v, spec, "v"))
    assert out.k.dtype == torch.float16 and out.context_len == payload.context_len


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), tokens=st.integers(0, 13), dim=st.integers(1, 9),
       scheme=st.sampled_from(SCHEMES[1:]), granularity=st.sampled_from(GRANULARITIES),
       block=st.integers(1, 5), symmetric=st.booleans(), scale_dtype=st.sampled_from(["fp16", "bf16"]),
       seed=st.integers(0, 1000), magnitude=st.sampled_from([1e-3, 1.0, 300.0]))
def test_round_trip_properties(layers, heads, tokens, dim, scheme, granularity, block, symmetric, scale_dtype,
                               seed, magnitude):
    symmetric = symmetric or scheme not in ("int8", "int4")
    config = WireConfig(scheme, granularity, block, symmetric, scale_dtype)
    payload = _payload(layers, heads, tokens, dim, seed, context=max(1, 5 * tokens))
    payload.k, payload.v = payload.k * magnitude, payload.v * magnitude
    blob = pack(payload, config)
    assert len(blob) == expected_size(config, layers, heads, dim, tokens,
                                      max_position=int(payload.positions[-1]) if tokens else None)
    out = unpack(blob)
    assert out.k.shape == payload.k.shape and torch.equal(out.positions, payload.positions)
    spec = config.spec(scheme)
    for role, original, decoded in (("k", payload.k, out.k), ("v", payload.v, out.v)):
        if tokens == 0:
            continue
        x = original.half()
        q = quantize(x, spec, role)
        assert torch.equal(dequantize(q, spec, torch.float16), decoded)
        exact = dequantize(q, spec, torch.float32)
        assert bool(((x.float() - exact).abs() <= error_bound(x, q, spec) * (1 + 1e-5) + 1e-12).all())


def test_int4_runs_pack_to_ceil_half():
    for count in range(0, 9):
        codes = torch.randint(-7, 8, (count,), dtype=torch.int8)
        packed = pack_nibbles(codes, signed=True)
        assert packed.numel() == (count + 1) // 2
        assert torch.equal(unpack_nibbles(packed, count, signed=True), codes)
    payload = _payload(layers=1, heads=1, tokens=3, dim=3)  # 9 values per K/V run: 5 bytes each
    info = inspect(pack(payload, WireConfig("int4", "layer")))
    assert info.breakdown["payload"] == 5 + 5


def test_mixed_precision_maps_and_breakdown():
    payload = _payload(layers=3, tokens=9)
    payload.token_precision = torch.tensor([1, 2, 3, 4, 5, 2, 2, 3, 1], dtype=torch.uint8)
    payload.layer_precision = torch.tensor([0, 1, 3], dtype=torch.uint8)  # last layer int4, middle fp16
    config = WireConfig("int8", "token", block_tokens=2)
    blob = pack(payload, config)
    assert len(blob) == expected_size(config, 3, 3, 8, 9, payload.token_precision, payload.layer_precision,
                                      max_position=int(payload.positions[-1]))
    out = unpack(blob)
    assert torch.equal(out.token_precision, payload.token_precision)
    assert torch.equal(out.k[1], payload.k[1].half())  # the fp16 layer is exact
    fp16_tokens = payload.token_precision == 1
    assert torch.equal(out.k[0][:, fp16_tokens], payload.k[0][:, fp16_tokens].half())
    bd = inspect(blob).breakdown
    assert sum(bd[s] for s in ("header", "indices", "map", "payload", "scales", "checksum")) == len(blob)
    assert bd["map"] == 3 + 9


def test_uint32_indices_for_long_contexts():
    payload = _payload(tokens=4, context=100_000)
    payload.positions = torch.tensor([1, 2, 65_535, 99_999])
    blob = pack(payload, WireConfig("int8"))
    assert inspect(blob).index_bytes_each == 4
    assert torch.equal(unpack(blob).positions, payload.positions)


def test_zstd_round_trip_is_identical_and_flagged():
    payload = _payload(tokens=64)
    plain, packed = pack(payload, WireConfig("int8")), pack(payload, WireConfig("int8", zstd=True))
    assert torch.equal(unpack(plain).k, unpack(packed).k)
    assert inspect(packed).config.zstd and inspect(packed).breakdown["stored_body"] != inspect(plain).breakdown["stored_body"]
    with pytest.raises(KVWireError, match="zstd"):
        expected_size(WireConfig("int8", zstd=True), 2, 3, 8, 64)


@pytest.mark.gpu
def test_cuda_or_cpu_tensors_pack_the_same():
    payload = _payload()
    gpu = KVPayload(payload.k.cuda(), payload.v.cuda(), payload.positions, payload.context_len)
    assert pack(gpu, WireConfig("int4", "token", 2)) == pack(payload, WireConfig("int4", "token", 2))


def test_packing_is_deterministic():
    payload = _payload()
    assert pack(payload, WireConfig("nf4")) == pack(payload, WireConfig("nf4"))


def _corrupt(blob, offset, fmt, value, fix_crc=True):
    data = bytearray(blob)
    struct.pack_into(fmt, data, offset, value)
    return _refresh_crc(bytes(data)) if fix_crc else bytes(data)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:40], "length: expected at least"),
    (lambda b: b[:-1], "length"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: _corrupt(b, 4, "<H", 9), "version: expected 1, found 9"),
    (lambda b: _corrupt(b, 6, "<H", 0x80), "flags: unknown bits"),
    (lambda b: _corrupt(b, 8, "<B", 77), "scheme: unknown code 77"),
    (lambda b: _corrupt(b, 12, "<H", 0), "layers"),
    (lambda b: _corrupt(b, 12, "<H", 60000), "layers"),
    (lambda b: _corrupt(b, 20, "<I", 100000), "tokens"),
    (lambda b: _corrupt(b, 28, "<I", 999), "index section"),
    (lambda b: _corrupt(b, 36, "<Q", 2 ** 60), "sections add up"),
    (lambda b: _corrupt(b, 52, "<Q", 2 ** 40), "length: header says"),
    (lambda b: _corrupt(b, 60, "<I", 1), "reserved"),
    (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "checksum"),
    (lambda b: _corrupt(b, 64, "<H", 40), "indices: expected strictly increasing"),
    (lambda b: _corrupt(b, 66, "<H", 0), "indices: expected strictly increasing"),
])
def test_hostile_blobs_raise_kvwire_errors(mutate, message):
    blob = pack(_payload(tokens=5, context=20), WireConfig("int8", "head"))
    with pytest.raises(KVWireError, match=message):
        unpack(mutate(blob))


def test_map_sizes_must_agree_with_the_header():
    payload = _payload(tokens=4)
    payload.token_precision = torch.tensor([2, 2, 2, 2], dtype=torch.uint8)
    blob = pack(payload, WireConfig("int8"))
    data = bytearray(blob)
    data[64 + 2 * 4 + 2 + 0] = 3  # first token int8 -> int4: the payload no longer matches the header
    with pytest.raises(KVWireError, match="payload/scales"):
        unpack(_refresh_crc(bytes(data)))
    data[64 + 2 * 4 + 2 + 0] = 9
    with pytest.raises(KVWireError, match="precision map"):
        unpack(_refresh_crc(bytes(data)))


@pytest.mark.parametrize("bad, message", [
    (dict(positions=torch.tensor([3, 2, 5, 6, 7])), "strictly increasing"),
    (dict(positions=torch.tensor([0, 1, 2])), "one per token"),
    (dict(context_len=4), "strictly increasing"),
    (dict(token_precision=torch.tensor([0, 1, 1, 1, 1])), "token_precision"),
    (dict(v=torch.zeros(1, 1, 1, 1)), "equal"),
])
def test_bad_payloads_are_refused_before_writing(bad, message):
    payload = _payload(tokens=5, context=20)
    for key, value in bad.items():
        setattr(payload, key, value)
    with pytest.raises(KVWireError, match=message):
        pack(payload, WireConfig("int8"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="int3"), "scheme"), (dict(granularity="row"), "granularity"),
    (dict(block_tokens=0), "block_tokens"), (dict(scale_dtype="fp32"), "scale_dtype"),
    (dict(value_dtype="fp32"), "value_dtype"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(KVWireError, match=message):
        WireConfig(**kwargs)


def test_fuzz_mutated_blobs_only_raise_kvwire_errors():
    rng = random.Random(1234)
    seeds = [pack(_payload(tokens=t, seed=t), config) for t, config in
             [(5, WireConfig("int8", "head")), (7, WireConfig("int4", "token", 3, symmetric=False)),
              (3, WireConfig("nf4", "kivi")), (6, WireConfig("fp8", "tensor", zstd=True))]]
    mixed = _payload(tokens=6)
    mixed.token_precision = torch.tensor([1, 2, 3, 4, 5, 2], dtype=torch.uint8)
    seeds.append(pack(mixed, WireConfig("int8", "token", 2)))
    outcomes = {"ok": 0, "error": 0}
    for trial in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            if action < 0.6 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif action < 0.8:
                del data[rng.randrange(len(data) + 1):]
            else:
                data[rng.randrange(len(data) + 1):rng.randrange(len(data) + 1)] = rng.randbytes(rng.randint(1, 8))
        blob = _refresh_crc(bytes(data)) if trial % 2 and len(data) >= 4 else bytes(data)
        try:
            unpack(blob)
            outcomes["ok"] += 1
        except KVWireError:
            outcomes["error"] += 1
    assert outcomes["error"] > 1000 and outcomes["ok"] + outcomes["error"] == 3000


def test_cli_inspect(tmp_path, capsys):
    from ember.cli import main

    path = tmp_path / "x.kvw"
    path.write_bytes((FIXTURES / "int4.kvw").read_bytes())
    assert main(["kvwire", "inspect", str(path)]) == 0
    assert "int4 / token (block 3)" in capsys.readouterr().out
    assert main(["kvwire", "inspect", str(path), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["breakdown"]["total"] == path.stat().st_size
    data = bytearray(path.read_bytes())
    data[70] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["kvwire", "inspect", str(path)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    path.write_bytes(b"junk")
    assert main(["kvwire", "inspect", str(path)]) == 2
    assert "length: expected at least" in capsys.readouterr().err


def test_precision_groups_with_drops_and_a_layer_schedule():
    from ember.kv.wire import payload_from_groups

    full = _payload(layers=3, tokens=6, context=6)
    groups = ["fp16", "drop", "int8", "int4", "drop", "int8"]
    payload = payload_from_groups(full.k, full.v, groups, layer_precision=[None, None, "fp16"])
    assert payload.positions.tolist() == [0, 2, 3, 5]
    blob = pack(payload, WireConfig("int8", "token"))
    out = unpack(blob)
    assert out.positions.tolist() == [0, 2, 3, 5] and out.k.shape == (3, 3, 4, 8)
    assert torch.equal(out.k[2], full.k[2][:, [0, 2, 3, 5]].half())  # the fp16 last layer is exact
    assert torch.equal(out.k[0][:, 0], full.k[0][:, 0].half())  # an fp16 token is exact
    assert len(blob) < len(pack(_payload(layers=3, tokens=6, context=6), WireConfig("fp16")))
    with pytest.raises(KVWireError, match="groups"):
        payload_from_groups(full.k, full.v, ["int2"] * 6)


def test_blob_checksum_is_zlib_crc32():
    """The fast CRC (ISA-L when installed) is the format's CRC-32: the blob's last four bytes equal zlib's CRC of
    everything before them (the slow reference), for a blob packed from several sections."""
    from ember.kv.wire import CHECKSUM_BYTES

    torch.manual_seed(0)
    k, v = torch.randn(3, 2, 37, 8).half(), torch.randn(3, 2, 37, 8).half()
    blob = pack(KVPayload(k, v, torch.arange(37), 40), WireConfig("int4", "token", block_tokens=4))
    assert int.from_bytes(blob[-CHECKSUM_BYTES:], "little") == zlib.crc32(blob[:-CHECKSUM_BYTES])
