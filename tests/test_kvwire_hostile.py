"""KVWire against hostile values and blobs: non-finite or out-of-range values and scales, zstd frames that lie
about their size, headers whose maps imply large work, unavailable devices. Cost bounds are asserted on
allocation sizes (tracemalloc for Python objects, a dispatch mode for torch storages), never on time."""

import struct
import tracemalloc
import zlib

import pytest
import torch
import zstandard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ember.errors import KVWireError
from ember.kv import KVPayload, WireConfig, inspect, pack, unpack
from ember.kv.quant import error_bound, quantize
from ember.kv.wire import FLAG_INDEX32, FLAG_MAP, FLAG_ZSTD, HEADER, MAGIC, ZSTD_CHUNK
from kvwire_golden import FIXTURES

FP16_NAN, FP16_INF = 0x7E00, 0x7C00


def _payload(layers=2, heads=2, tokens=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KVPayload(torch.randn(layers, heads, tokens, dim, generator=g),
                     torch.randn(layers, heads, tokens, dim, generator=g), torch.arange(tokens), tokens)


def _blob(header_fields: dict, body: bytes) -> bytes:
    """A blob with a valid CRC from header fields (defaults: int8 / head, one layer, head, token)."""
    fields = dict(flags=0, scheme=2, granularity=2, scale_dtype=1, value_dtype=1, layers=1, heads=1, head_dim=8,
                  block=1, tokens=1, context=1, index_bytes=2, map_bytes=0, payload=0, scales=0, stored=len(body))
    fields.update(header_fields)
    header = HEADER.pack(MAGIC, 1, *fields.values())
    return header + body + struct.pack("<I", zlib.crc32(header + body))


def _with(blob: bytes, offset: int, fmt: str, value) -> bytes:
    """`blob` with one field overwritten and the CRC refreshed."""
    data = bytearray(blob[:-4])
    struct.pack_into(fmt, data, offset, value)
    return bytes(data) + struct.pack("<I", zlib.crc32(data))


def _python_peak(call) -> int:
    """Peak bytes of Python allocations while `call` runs (it must raise KVWireError)."""
    tracemalloc.start()
    try:
        with pytest.raises(KVWireError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class _LargestStorage(TorchDispatchMode):
    """Records the largest storage among the outputs of every torch op run while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.untyped_storage().nbytes())
        return out


# item 3: values and scales


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("config", [WireConfig("fp16"), WireConfig("int8", "head"), WireConfig("nf4", "tensor")])
def test_pack_refuses_non_finite_values_naming_layer_and_tensor(bad, config):
    payload = _payload()
    payload.v[1, 0, 2, 3] = bad
    with pytest.raises(KVWireError, match=r"payload V, layer 1: expected finite values, found -?(nan|inf) "
                                          r"\(head 0, token 2, dim 3\)"):
        pack(payload, config)


@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4", "nf4", "fp8"])
def test_values_beyond_fp16_are_refused_and_travel_as_bf16(scheme):
    payload = _payload()
    payload.k[0, 1, 1, 2] = 70000.0  # once silently inf: under int8 / head the rest of the head decoded as 0.0
    with pytest.raises(KVWireError, match=r"payload K, layer 0: expected \|values\| <= 65504 \(value_dtype fp16; "
                                          r"'bf16' holds larger ones\), found 70000"):
        pack(payload, WireConfig(scheme, "head"))
    config = WireConfig(scheme, "head", scale_dtype="bf16", value_dtype="bf16")
    out = unpack(pack(payload, config))
    x = payload.k.to(torch.bfloat16)
    q = quantize(x, config.spec(scheme), "k")
    error = (out.k.float() - x.float()).abs()
    assert bool(torch.isfinite(out.k).all())
    assert bool((error <= error_bound(x, q, config.spec(scheme)) * 1.01 + x.float().abs() / 128).all())


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "fp8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_values_at_the_fp16_limit_decode_finite(scheme, symmetric):
    payload = _payload()
    payload.k[0, 0, 0, 0], payload.v[1, 1, 3, 7] = 65504.0, -65504.0  # a code x rounded-up scale once gave inf
    config = WireConfig(scheme, "head", symmetric=symmetric or scheme not in ("int8", "int4"))
    out = unpack(pack(payload, config))
    assert bool(torch.isfinite(out.k).all()) and bool(torch.isfinite(out.v).all())
    assert float(out.k[0, 0, 0, 0]) > 60000 and float(out.v[1, 1, 3, 7]) < -60000


def test_scales_beyond_the_scale_dtype_are_refused():
    payload = _payload()
    payload.k[1, 0, 0, 0] = 1e6  # fits bf16 values, but an nf4 scale of 1e6 does not fit an fp16 scale
    with pytest.raises(KVWireError, match=r"payload K, layer 1: scale: expected finite values with \|x\| <= 65504 "
                                          r"\(scale_dtype fp16; 'bf16' holds larger ones\), found 9"):
        pack(payload, WireConfig("nf4", "head", value_dtype="bf16"))
    with pytest.raises(KVWireError, match="payload K, all layers: scale"):
        pack(payload, WireConfig("nf4", "tensor", value_dtype="bf16"))
    payload.k[1, 0, 0, 0] = -1e6
    with pytest.raises(KVWireError, match="payload K, layer 1: zero point: expected finite"):
        pack(payload, WireConfig("int8", "head", symmetric=False, value_dtype="bf16"))
    assert unpack(pack(payload, WireConfig("nf4", "head", scale_dtype="bf16", value_dtype="bf16"))).k[1, 0, 0, 0] < -9e5


def _scales_offset(blob: bytes) -> int:
    bd = inspect(blob).breakdown
    return HEADER.size + bd["indices"] + bd["map"] + bd["payload"]


@pytest.mark.parametrize("bits", [FP16_NAN, FP16_INF, FP16_INF | 0x8000])
def test_unpack_refuses_non_finite_scales_and_zero_points(bits):
    scaled = pack(_payload(), WireConfig("int8", "layer"))  # scales: K layer 0, V layer 0, K layer 1, V layer 1
    with pytest.raises(KVWireError, match=r"scales \(V, layer 0\): expected finite scales and zero points"):
        unpack(_with(scaled, _scales_offset(scaled) + 2, "<H", bits))
    asymmetric = pack(_payload(), WireConfig("int4", "layer", symmetric=False))  # K scale, K zero point, ...
    with pytest.raises(KVWireError, match=r"scales \(K, layer 0\): expected finite"):
        unpack(_with(asymmetric, _scales_offset(asymmetric) + 2, "<H", bits))
    shared = (FIXTURES / "mixed_map.kvw").read_bytes()  # tensor granularity: int8 K, int8 V, int4 K, ...
    with pytest.raises(KVWireError, match=r"scales \(V, all layers\): expected finite"):
        unpack(_with(shared, _scales_offset(shared) + 2, "<H", bits))


def test_unpack_refuses_non_finite_values():
    plain = pack(_payload(), WireConfig("fp16"))
    with pytest.raises(KVWireError, match=r"payload \(K, layer 0\): expected finite values, found NaN or inf fp16"):
        unpack(_with(plain, _scales_offset(plain) - inspect(plain).breakdown["payload"], "<H", FP16_INF))
    fp8 = pack(_payload(), WireConfig("fp8", "head"))
    with pytest.raises(KVWireError, match=r"payload \(K, layer 0\): expected finite values, found NaN or inf fp8"):
        unpack(_with(fp8, _scales_offset(fp8) - inspect(fp8).breakdown["payload"], "<B", 0x7F))  # e4m3 NaN


# item 4: zstd frames that lie about their size


def _unsized_frame(data: bytes) -> bytes:
    """A zstd frame that does not record its content size (as streaming compressors write it)."""
    compressor = zstandard.ZstdCompressor().compressobj()
    return compressor.compress(data) + compressor.flush()


def test_zstd_header_claiming_60_gib_is_refused_before_decompressing():
    frame = _unsized_frame(struct.pack("<5H", 0, 1, 2, 3, 4) + bytes(8))
    blob = _blob(dict(flags=FLAG_ZSTD, tokens=5, context=5, index_bytes=10, payload=60 << 30), frame)
    assert len(blob) < 100
    with pytest.raises(KVWireError, match=r"payload/scales: .*impl(y|ies) 80/4 bytes"):
        unpack(blob)  # once MemoryError: a 60 GiB output buffer
    assert _python_peak(lambda: unpack(blob)) < 1 << 20


def test_zstd_frame_shorter_than_consistent_huge_dimensions_allocates_what_it_holds():
    layers, heads, dim, tokens = 1024, 1024, 4096, 7  # int8 / head: 56 GiB of payload, all consistent
    payload, scales = 2 * layers * heads * tokens * dim, 2 * 2 * layers * heads
    frame = _unsized_frame(struct.pack("<7H", *range(7)) + bytes(4096))
    blob = _blob(dict(flags=FLAG_ZSTD, layers=layers, heads=heads, head_dim=dim, tokens=tokens, context=tokens,
                      index_bytes=14, payload=payload, scales=scales), frame)
    with pytest.raises(KVWireError, match=f"zstd body: expected {14 + payload + scales} bytes after decompression, "
                                          f"found {14 + 4096}"):
        unpack(blob)
    assert _python_peak(lambda: unpack(blob)) < 2 * ZSTD_CHUNK + (1 << 20)


def test_zstd_frame_expanding_past_the_header_stops_at_the_declared_size():
    payload = _payload()
    plain, compressed = pack(payload, WireConfig("int8", "head")), pack(payload, WireConfig("int8", "head", zstd=True))
    body = plain[HEADER.size:-4]
    frame = zstandard.ZstdCompressor().compress(body + bytes(64 << 20))  # records 64 MiB as its content size
    assert len(frame) < 64 << 10
    header = bytearray(compressed[:HEADER.size])
    struct.pack_into("<Q", header, 52, len(frame))
    blob = bytes(header) + frame + struct.pack("<I", zlib.crc32(bytes(header) + frame))
    with pytest.raises(KVWireError, match=f"zstd body: expected {len(body)} bytes after decompression, found"):
        unpack(blob)
    assert _python_peak(lambda: unpack(blob)) < 4 << 20  # once the whole 64 MiB before the size check
    for trailing in (b"junk", frame):  # data after the frame
        tail = bytes(header[:52]) + struct.pack("<Q", len(compressed) - 68 + len(trailing)) + bytes(4)
        with pytest.raises(KVWireError, match="zstd body"):
            unpack(tail + compressed[HEADER.size:-4] + trailing
                   + struct.pack("<I", zlib.crc32(tail + compressed[HEADER.size:-4] + trailing)))


# item 5: work and memory before the size checks


@pytest.mark.parametrize("tokens, width, codes", [(200_000, 4, [2]), (65_536, 2, [1, 2, 3, 4, 5])])
def test_sizes_are_checked_before_work_grows_with_layers_times_tokens(tokens, width, codes):
    layers = 1024  # a blob of at most 1 MiB whose map once made a (L, T) grid of 64 to 200 MB before the checks
    body = struct.pack(f"<{tokens}{'I' if width == 4 else 'H'}", *range(tokens)) + bytes(layers) + \
        bytes(codes[t % len(codes)] for t in range(tokens))
    blob = _blob(dict(flags=FLAG_MAP | (FLAG_INDEX32 if width == 4 else 0), layers=layers, tokens=tokens,
                      context=tokens, index_bytes=width * tokens, map_bytes=layers + tokens), body)
    assert len(blob) < 1 << 20
    with _LargestStorage() as storages:
        with pytest.raises(KVWireError, match=r"payload/scales: .*impl(y|ies) \d+/\d+ bytes, header says 0/0"):
            unpack(blob)
    assert storages.largest <= len(blob)
    assert _python_peak(lambda: unpack(blob)) <= 2 * len(blob)


# item 12: devices


def test_unpack_onto_an_unavailable_device_is_a_kvwire_error():
    blob = (FIXTURES / "int8.kvw").read_bytes()
    missing = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(KVWireError, match=f"device: expected an available torch device, found '{missing}'"):
        unpack(blob, device=missing)
    with pytest.raises(KVWireError, match="device: expected an available torch device, found 'gpu0'"):
        unpack(blob, device="gpu0")
