"""KVWire v1: one contiguous, self-describing blob holding a (possibly quantized, token-selected) KV cache.

Layout (little-endian; docs/kvwire.md is the normative spec):

  header   64 bytes  magic b"KVW1", version, flags, codes, dims, token count, section lengths
  body               indices | precision map | payload | scales   (zstd-compressed as a whole if flagged)
  crc32     4 bytes  CRC-32 of header + stored body

Payload and scales are laid out in segments, one per (layer, precision present in that layer) in ascending
precision code, K before V; every size follows from the header and the map, so there are no per-token headers.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field, replace

import numpy
import torch

try:  # CRC-32 (zlib's polynomial) with SIMD, several times zlib's speed; the same checksum either way
    from isal.isal_zlib import crc32
except ImportError:  # a machine without the wheel (an offline GPU box) falls back to zlib
    from zlib import crc32

from ember.errors import KVWireError
from ember.kv.quant import SCALE_DTYPES, Quantized, QuantSpec, all_finite, dequantize, group_stats, pack_nibbles
from ember.kv.quant import quantize, scale_shape, unpack_nibbles

MAGIC = b"KVW1"
VERSION = 1
HEADER = struct.Struct("<4sHHBBBBHHHHIIIIQQQ4x")  # 64 bytes, the last 4 reserved (zero)
CHECKSUM_BYTES = 4
FLAG_INDEX32, FLAG_MAP, FLAG_ZSTD, FLAG_ASYMMETRIC = 1, 2, 4, 8
KNOWN_FLAGS = FLAG_INDEX32 | FLAG_MAP | FLAG_ZSTD | FLAG_ASYMMETRIC
PRECISION_CODES = {"fp16": 1, "int8": 2, "int4": 3, "nf4": 4, "fp8": 5}
PRECISION_NAMES = {code: name for name, code in PRECISION_CODES.items()}
INHERIT = 0  # layer map value: the layer follows the token map
GRANULARITY_CODES = {"tensor": 0, "layer": 1, "head": 2, "token": 3, "kivi": 4}
DTYPE_CODES = {"fp16": 1, "bf16": 2}
VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LIMITS = {"layers": 1024, "heads": 1024, "head_dim": 4096, "tokens": 1 << 26, "body": 1 << 36}
ZSTD_CHUNK = 1 << 20  # a zstd body is decompressed this many bytes at a time


@dataclass(frozen=True)
class WireConfig(QuantSpec):
    """Encoding choices: a QuantSpec whose `scheme` is the precision of every cell unless a precision map
    says otherwise, plus the value dtype and the optional zstd stage."""

    value_dtype: str = "fp16"
    zstd: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.value_dtype not in VALUE_DTYPES:
            raise KVWireError(f"value_dtype: expected one of {tuple(VALUE_DTYPES)}, found {self.value_dtype!r}")

    def spec(self, precision: str) -> QuantSpec:
        """The QuantSpec of cells of one precision."""
        return QuantSpec(precision, self.granularity, self.block_tokens, self.symmetric, self.scale_dtype)


@dataclass
class KVPayload:
    """What travels: K and V (L, H, T, D) for T selected tokens at sorted absolute `positions` (T,) of a
    context of `context_len` tokens, with optional precision maps: per token (T,) codes 1..5 and per layer
    (L,) codes 0..5 (0 = follow the token map)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    context_len: int
    token_precision: torch.Tensor | None = None
    layer_precision: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.k.shape)


@dataclass
class WireInfo:
    """A parsed header and section sizes (`breakdown`, bytes), as `inspect` reports them."""

    config: WireConfig
    layers: int
    heads: int
    head_dim: int
    tokens: int
    context_len: int
    index_bytes_each: int
    has_map: bool
    breakdown: dict = field(default_factory=dict)
    checksum_ok: bool = True

    def as_dict(self) -> dict:
        return {"version": VERSION, "scheme": self.config.scheme, "granularity": self.config.granularity,
                "block_tokens": self.config.block_tokens, "symmetric": self.config.symmetric,
                "scale_dtype": self.config.scale_dtype, "value_dtype": self.config.value_dtype,
                "zstd": self.config.zstd, "layers": self.layers, "heads": self.heads, "head_dim": self.head_dim,
                "tokens": self.tokens, "context_len": self.context_len, "index_bytes_each": self.index_bytes_each,
                "precision_map": self.has_map, "breakdown": self.breakdown, "checksum_ok": self.checksum_ok}


def _segments(layers: int, tokens: int, default: str, token_precision=None, layer_precision=None) -> list:
    """(layer, precision code, token count) for each segment, in wire order, straight from the maps: a layer with
    a code of its own is one segment of all T tokens, the other layers share the token map's groups, counted once
    (O(L + T) work, no (L, T) grid, no temporary larger than the map)."""
    if not tokens:
        return []
    if token_precision is None:
        groups = [(PRECISION_CODES[default], tokens)]
    else:
        codes = token_precision.to(torch.uint8).cpu().reshape(-1)
        groups = [(code, count) for code in sorted(PRECISION_NAMES) if (count := int((codes == code).sum()))]
    own = [INHERIT] * layers if layer_precision is None else layer_precision.to(torch.uint8).cpu().tolist()
    return [(layer, code, count) for layer, mine in enumerate(own)
            for code, count in (groups if mine == INHERIT else [(mine, tokens)])]


def _with_indices(segments: list, tokens: int, token_precision) -> list:
    """The segments as (layer, code, count, token indices): slice(None) for a segment of every token (a view, no
    gather), else the tokens the token map gives its code (found once per code)."""
    found = {}
    for _, code, count in segments:
        if count < tokens and code not in found:
            found[code] = (token_precision.to(torch.uint8).cpu().reshape(-1) == code).nonzero()[:, 0]
    return [(layer, code, count, slice(None) if count == tokens else found[code]) for layer, code, count in segments]


def _shared_codes(segments: list) -> list[int]:
    """Tensor granularity: the quantized precisions present, in the order of their shared scales."""
    return sorted({segment[1] for segment in segments} - {PRECISION_CODES["fp16"]})


def _payload_bytes(precision: str, count: int) -> int:
    return {"fp16": 2 * count, "int8": count, "fp8": count}.get(precision, (count + 1) // 2)


def _scale_count(config: WireConfig, precision: str, heads: int, tokens: int, dim: int, role: str) -> int:
    if precision == "fp16" or config.granularity == "tensor":
        return 0
    return int(torch.Size(scale_shape((heads, tokens, dim), config.spec(precision), role)).numel())


def _section_sizes(config: WireConfig, heads: int, dim: int, segments: list) -> tuple[int, int]:
    """(payload bytes, scale bytes) implied by the config and the segments: arithmetic, nothing allocated."""
    payload = scales = 0
    for _, code, count in segments:
        name = PRECISION_NAMES[code]
        per = 2 * (2 if config.spec(name).has_offset else 1)  # scale (+ offset), 2 bytes each
        for role in ("k", "v"):
            payload += _payload_bytes(name, heads * count * dim)
            scales += per * _scale_count(config, name, heads, count, dim, role)
    for code in _shared_codes(segments) if config.granularity == "tensor" else []:
        scales += 2 * 2 * (2 if config.spec(PRECISION_NAMES[code]).has_offset else 1)
    return payload, scales


def expected_size(config: WireConfig, layers: int, heads: int, head_dim: int, tokens: int,
                  token_precision=None, layer_precision=None, max_position: int | None = None) -> int:
    """Exact length of `pack` output for these shapes and maps (uncompressed configs only)."""
    if config.zstd:
        raise KVWireError("expected_size: zstd output size depends on the data; use a config with zstd=False")
    has_map = token_precision is not None or layer_precision is not None
    segments = _segments(layers, tokens, config.scheme, token_precision, layer_precision)
    payload, scales = _section_sizes(config, heads, head_dim, segments)
    width = 4 if (max_position if max_position is not None else tokens - 1) >= 65536 else 2
    return HEADER.size + width * tokens + (layers + tokens if has_map else 0) + payload + scales + CHECKSUM_BYTES


def size_for_counts(config: WireConfig, layers: int, heads: int, head_dim: int, counts: dict[str, int],
                    has_map: bool, max_position: int) -> int:
    """Exact length of an uncompressed blob carrying `counts[precision]` tokens of each precision at every
    layer (no layer map), positions up to `max_position`: the arithmetic of `expected_size` from counts alone
    (every layer holds the same segments, so one layer's sections are priced and multiplied), cheap enough for
    an allocator to price each candidate step."""
    present = sorted((PRECISION_CODES[name], count) for name, count in counts.items() if count)
    tokens = sum(count for _, count in present)
    width = 4 if max_position >= 65536 else 2
    total = HEADER.size + width * tokens + (layers + tokens if has_map else 0) + CHECKSUM_BYTES
    for code, count in present:
        payload, scales = _segment_sizes(config, heads, head_dim, code, count)
        total += layers * (payload + scales)
    if config.granularity == "tensor":
        total += _section_sizes(config, heads, head_dim, [(0, code, 1) for code, _ in present])[1]
    return total


def layer_bytes(payload: KVPayload, config: WireConfig) -> list[int]:
    """Payload + scale bytes each layer of `payload` takes in its blob at `config` (header, indices, maps,
    tensor-shared scales and checksum excluded): which layers the bytes go to."""
    layers, heads, tokens, dim = payload.shape
    out = [0] * layers
    for layer, code, count in _segments(layers, tokens, config.scheme, payload.token_precision,
                                        payload.layer_precision):
        out[layer] += sum(_segment_sizes(config, heads, dim, code, count))
    return out


def _segment_sizes(config: WireConfig, heads: int, head_dim: int, code: int, count: int) -> tuple[int, int]:
    """(payload, scale) bytes of one layer's segment of `count` tokens (tensor-shared scales excluded)."""
    if config.granularity == "tensor":
        return _section_sizes(replace(config, granularity="layer"), heads, head_dim, [(0, code, count)])[0], 0
    return _section_sizes(config, heads, head_dim, [(0, code, count)])


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as a view (no copy on the CPU): pack joins the views into the blob once."""
    return memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def _encode_codes(q: Quantized, precision: str) -> memoryview:
    if precision in ("int4", "nf4"):
        return _tensor_bytes(pack_nibbles(q.codes, signed=q.codes.dtype == torch.int8))
    return _tensor_bytes(q.codes)


def pack(payload: KVPayload, config: WireConfig) -> bytes:
    """Quantize and serialize a payload into one KVWire blob.

    Values must be finite and within the value dtype's range (fp16: |x| <= 65504; beyond it a value would decode
    as inf, and value_dtype='bf16' holds it), and every scale within the scale dtype's: otherwise KVWireError
    names the tensor and layer.
    """
    k, v, positions = payload.k, payload.v, payload.positions.reshape(-1).long().cpu()
    _check_payload(payload, positions)
    layers, heads, tokens, dim = k.shape
    vdtype = VALUE_DTYPES[config.value_dtype]
    k, v = k.to(vdtype), v.to(vdtype)
    for role, original, cast in (("K", payload.k, k), ("V", payload.v, v)):
        _check_values(role, original, cast, config.value_dtype)
    has_map = payload.token_precision is not None or payload.layer_precision is not None
    segments = _with_indices(_segments(layers, tokens, config.scheme, payload.token_precision,
                                       payload.layer_precision), tokens, payload.token_precision)
    shared = _shared_stats(config, k, v, segments) if config.granularity == "tensor" else {}
    body_payload, body_scales = [], []
    for code in sorted(shared):
        for role, stats in zip("kv", shared[code]):
            q = _quantize(torch.zeros((1, 1, 1), dtype=vdtype), config.spec(PRECISION_NAMES[code]), role, stats,
                          "all layers")
            body_scales.append(_scale_bytes(q))
    for layer, code, _, idx in segments:
        name = PRECISION_NAMES[code]
        for role, tensor in (("k", k), ("v", v)):
            stats = shared[code][role == "v"] if code in shared else None
            q = _quantize(_select(tensor, layer, idx), config.spec(name), role, stats, f"layer {layer}")
            body_payload.append(_encode_codes(q, name))
            if config.granularity != "tensor":
                body_scales.append(_scale_bytes(q))
    width = 4 if tokens and int(positions[-1]) >= 65536 else 2
    indices = positions.numpy().astype("<u4" if width == 4 else "<u2").tobytes()
    maps = b""
    if has_map:
        lp = payload.layer_precision if payload.layer_precision is not None else torch.zeros(layers)
        tp = payload.token_precision if payload.token_precision is not None else \
            torch.full((tokens,), PRECISION_CODES[config.scheme])
        maps = bytes(_tensor_bytes(lp.to(torch.uint8))) + bytes(_tensor_bytes(tp.to(torch.uint8)))
    payload_len, scale_len = sum(map(len, body_payload)), sum(map(len, body_scales))
    sections = [indices, maps, *body_payload, *body_scales]
    stored = [_zstd().ZstdCompressor(level=3).compress(b"".join(sections))] if config.zstd else sections
    stored_len = sum(map(len, stored))
    flags = (FLAG_INDEX32 if width == 4 else 0) | (FLAG_MAP if has_map else 0) | \
        (FLAG_ZSTD if config.zstd else 0) | (0 if config.symmetric else FLAG_ASYMMETRIC)
    header = HEADER.pack(MAGIC, VERSION, flags, PRECISION_CODES[config.scheme], GRANULARITY_CODES[config.granularity],
                         DTYPE_CODES[config.scale_dtype], DTYPE_CODES[config.value_dtype], layers, heads, dim,
                         config.block_tokens, tokens, payload.context_len, len(indices), len(maps),
                         payload_len, scale_len, stored_len)
    checksum = crc32(header)
    for section in stored:  # CRC of header + body, section by section
        checksum = crc32(section, checksum)
    return b"".join([header, *stored, struct.pack("<I", checksum)])  # the one copy of every section


def _scale_bytes(q: Quantized) -> bytes:
    if q.scale is None:
        return b""
    return bytes(_tensor_bytes(q.scale)) + (b"" if q.offset is None else bytes(_tensor_bytes(q.offset)))


def _select(tensor: torch.Tensor, layer: int, idx) -> torch.Tensor:
    """One segment's values (H, t, D) of a (L, H, T, D) tensor."""
    return tensor[layer][:, idx if isinstance(idx, slice) else idx.to(tensor.device)]


def _quantize(segment: torch.Tensor, spec: QuantSpec, role: str, stats, where: str) -> Quantized:
    """`quantize`, with errors naming the tensor and `where` it sits."""
    try:
        return quantize(segment, spec, role, stats=stats)
    except KVWireError as error:
        raise KVWireError(f"payload {role.upper()}, {where}: {error}") from error


def _check_values(role: str, original: torch.Tensor, cast: torch.Tensor, value_dtype: str) -> None:
    """Refuse NaN / inf inputs, and values that become inf in the value dtype, naming the first one."""
    if all_finite(cast):  # NaN / inf inputs stay non-finite in the cast: one pass when all is well
        return
    bad = ~torch.isfinite(original)
    beyond = not bool(bad.any())
    layer, head, token, dim = (~torch.isfinite(cast) if beyond else bad).nonzero()[0].tolist()
    expected = f"|values| <= {torch.finfo(cast.dtype).max:g} (value_dtype {value_dtype}; 'bf16' holds larger ones)" \
        if beyond else "finite values"
    raise KVWireError(f"payload {role}, layer {layer}: expected {expected}, found "
                      f"{float(original[layer, head, token, dim]):g} (head {head}, token {token}, dim {dim})")


def _shared_stats(config: WireConfig, k, v, segments: list) -> dict:
    """Tensor granularity: per quantized precision, one set of statistics over all of its cells, for K and V."""
    shared = {}
    for code in _shared_codes(segments):
        spec = config.spec(PRECISION_NAMES[code])
        per_role = []
        for role, tensor in (("k", k), ("v", v)):
            cells = torch.cat([_select(tensor, layer, idx).reshape(-1) for layer, c, _, idx in segments if c == code])
            per_role.append(tuple(s.reshape(1, 1, 1) for s in group_stats(cells.reshape(1, 1, -1, 1), spec, role)))
        shared[code] = per_role
    return shared


def _check_payload(payload: KVPayload, positions: torch.Tensor) -> None:
    k, v = payload.k, payload.v
    if k.dim() != 4 or k.shape != v.shape:
        raise KVWireError(f"payload k/v: expected equal (L, H, T, D) shapes, found {tuple(k.shape)}, {tuple(v.shape)}")
    layers, heads, tokens, dim = k.shape
    if positions.numel() != tokens:
        raise KVWireError(f"positions: expected {tokens} (one per token), found {positions.numel()}")
    if tokens and (positions.min() < 0 or positions.max() >= payload.context_len
                   or (tokens > 1 and bool((positions[1:] <= positions[:-1]).any()))):
        raise KVWireError(f"positions: expected strictly increasing values in [0, {payload.context_len}), "
                          f"found {positions.tolist()[:8]}...")
    if payload.context_len >= 1 << 32:
        raise KVWireError(f"context_len: expected < 2**32, found {payload.context_len}")
    for name, limit, value in (("layers", LIMITS["layers"], layers), ("heads", LIMITS["heads"], heads),
                               ("head_dim", LIMITS["head_dim"], dim)):
        if not 1 <= value <= limit:
            raise KVWireError(f"{name}: expected 1..{limit}, found {value}")
    for name, mp, size, low in (("token_precision", payload.token_precision, tokens, 1),
                                ("layer_precision", payload.layer_precision, layers, 0)):
        if mp is None:
            continue
        if mp.numel() != size or (size and (int(mp.min()) < low or int(mp.max()) > 5)):
            raise KVWireError(f"{name}: expected {size} codes in {low}..5, found {mp.tolist()[:8]}")


def _zstd():
    try:
        import zstandard
    except ImportError as error:  # pragma: no cover - zstandard is a dependency
        raise KVWireError("zstd: the 'zstandard' package is needed for zstd blobs (pip install zstandard)") from error
    return zstandard


def _read_header(blob: bytes) -> tuple:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise KVWireError(f"blob: expected bytes, found {type(blob).__name__}")
    if len(blob) < HEADER.size + CHECKSUM_BYTES:
        raise KVWireError(f"length: expected at least {HEADER.size + CHECKSUM_BYTES} bytes, found {len(blob)}")
    fields = HEADER.unpack_from(blob, 0)
    if fields[0] != MAGIC:
        raise KVWireError(f"magic: expected {MAGIC!r}, found {bytes(fields[0])!r}")
    if fields[1] != VERSION:
        raise KVWireError(f"version: expected {VERSION}, found {fields[1]}")
    if bytes(blob[60:64]) != bytes(4):
        raise KVWireError("reserved header bytes: expected zeros, found other values")
    return fields


def inspect(blob: bytes) -> WireInfo:
    """Parse the header and section sizes and verify the checksum, without decoding the payload."""
    (_, _, flags, scheme, gran, sdt, vdt, layers, heads, dim, block, tokens, context_len,
     idx_len, map_len, pay_len, scale_len, stored_len) = _read_header(blob)
    if flags & ~KNOWN_FLAGS:
        raise KVWireError(f"flags: unknown bits {flags & ~KNOWN_FLAGS:#x}")
    names = {"scheme": (scheme, PRECISION_NAMES), "granularity": (gran, {v: k for k, v in GRANULARITY_CODES.items()}),
             "scale_dtype": (sdt, {v: k for k, v in DTYPE_CODES.items()}),
             "value_dtype": (vdt, {v: k for k, v in DTYPE_CODES.items()})}
    decoded = {}
    for name, (code, table) in names.items():
        if code not in table:
            raise KVWireError(f"{name}: unknown code {code} (expected one of {sorted(table)})")
        decoded[name] = table[code]
    for name, value, limit in (("layers", layers, LIMITS["layers"]), ("heads", heads, LIMITS["heads"]),
                               ("head_dim", dim, LIMITS["head_dim"]), ("tokens", tokens, LIMITS["tokens"])):
        if not (0 if name == "tokens" else 1) <= value <= limit:
            raise KVWireError(f"{name}: expected at most {limit} (and > 0), found {value}")
    if block < 1:
        raise KVWireError(f"block_tokens: expected >= 1, found {block}")
    if tokens > context_len:
        raise KVWireError(f"tokens: expected at most context_len {context_len}, found {tokens}")
    try:
        config = WireConfig(decoded["scheme"], decoded["granularity"], block, not flags & FLAG_ASYMMETRIC,
                            decoded["scale_dtype"], decoded["value_dtype"], bool(flags & FLAG_ZSTD))
    except KVWireError as error:
        raise KVWireError(f"header: inconsistent encoding ({error})") from error
    if len(blob) != HEADER.size + stored_len + CHECKSUM_BYTES:
        raise KVWireError(f"length: header says body of {stored_len} bytes (blob {HEADER.size + stored_len + 4}), "
                          f"found blob of {len(blob)}")
    width = 4 if flags & FLAG_INDEX32 else 2
    if idx_len != width * tokens:
        raise KVWireError(f"index section: expected {width * tokens} bytes for {tokens} tokens, found {idx_len}")
    has_map = bool(flags & FLAG_MAP)
    if map_len != ((layers + tokens) if has_map else 0):
        raise KVWireError(f"map section: expected {(layers + tokens) if has_map else 0} bytes, found {map_len}")
    if not (flags & FLAG_ZSTD) and stored_len != idx_len + map_len + pay_len + scale_len:
        raise KVWireError(f"body: sections add up to {idx_len + map_len + pay_len + scale_len} bytes, "
                          f"found {stored_len}")
    if idx_len + map_len + pay_len + scale_len > LIMITS["body"]:
        raise KVWireError(f"body: expected at most {LIMITS['body']} bytes, found {idx_len + map_len + pay_len + scale_len}")
    (stored_crc,) = struct.unpack_from("<I", blob, len(blob) - CHECKSUM_BYTES)
    checksum_ok = crc32(memoryview(blob)[:-CHECKSUM_BYTES]) == stored_crc
    breakdown = {"header": HEADER.size, "indices": idx_len, "map": map_len, "payload": pay_len, "scales": scale_len,
                 "checksum": CHECKSUM_BYTES, "stored_body": stored_len, "total": len(blob)}
    return WireInfo(config, layers, heads, dim, tokens, context_len, width, has_map, breakdown, checksum_ok)


class _BodyReader:
    """A blob's body, read section by section in order. A zstd body is decompressed as it is read, ZSTD_CHUNK
    bytes at a time and never past the `size` bytes the header declares, so memory follows what the frame
    really holds (a frame claiming gigabytes allocates nothing), and a frame that expands further fails as soon
    as one byte past the declared size comes out."""

    def __init__(self, stored: memoryview, compressed: bool, size: int):
        self.stored, self.size, self.cursor = stored, size, 0
        self.stream = _zstd().ZstdDecompressor().stream_reader(stored) if compressed else None

    def read(self, n: int):
        """The next n bytes (a view of the blob when uncompressed)."""
        self.cursor += n
        if self.stream is None:
            return self.stored[self.cursor - n:self.cursor]
        out = bytearray()
        while len(out) < n:
            chunk = self._decompress(min(ZSTD_CHUNK, n - len(out)))
            if not chunk:
                raise KVWireError(f"zstd body: expected {self.size} bytes after decompression, "
                                  f"found {self.cursor - n + len(out)}")
            out += chunk
        return out

    def finish(self) -> None:
        """Check that a zstd frame ends where the header says the body does."""
        if self.stream is not None and self._decompress(1):
            raise KVWireError(f"zstd body: expected {self.size} bytes after decompression, found more")

    def _decompress(self, n: int) -> bytes:
        try:
            return self.stream.read(n)
        except _zstd().ZstdError as error:
            raise KVWireError(f"zstd body: cannot be decompressed ({error})") from error


def _device(device) -> torch.device:
    """`device` as a torch.device, once a tensor can be made there."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ValueError) as error:  # torch raises AssertionError without CUDA
        raise KVWireError(f"device: expected an available torch device, found {device!r} ({error})") from error
    return torch.device(device)


def unpack(blob: bytes, device="cpu") -> KVPayload:
    """Decode a KVWire blob into dequantized K/V (on `device`, in the blob's value dtype), positions and maps.

    Needs no config: the blob describes itself. Every inconsistency (an unavailable `device` too) raises
    KVWireError naming the field. The payload and scale sizes the dimensions and maps imply are checked before
    the payload is read or decompressed, and until every check passes no allocation is larger than the blob
    (a zstd body's: than what its frame really holds, up to the declared sizes).
    """
    device = _device(device)
    info = inspect(blob)
    if not info.checksum_ok:
        raise KVWireError("checksum: CRC-32 mismatch (the blob is corrupt)")
    config, bd = info.config, info.breakdown
    body = _BodyReader(memoryview(blob)[HEADER.size:len(blob) - CHECKSUM_BYTES], config.zstd,
                       bd["indices"] + bd["map"] + bd["payload"] + bd["scales"])
    tokens, layers = info.tokens, info.layers
    indices = numpy.frombuffer(body.read(bd["indices"]), dtype="<u4" if info.index_bytes_each == 4 else "<u2")
    if tokens and (int(indices[-1]) >= info.context_len or bool((indices[1:] <= indices[:-1]).any())):
        raise KVWireError(f"indices: expected strictly increasing positions below {info.context_len}")
    token_precision = layer_precision = None
    if info.has_map:
        maps = torch.frombuffer(bytearray(body.read(bd["map"])), dtype=torch.uint8)
        layer_precision, token_precision = maps[:layers].clone(), maps[layers:].clone()
        if bool((layer_precision > 5).any()) or (tokens and bool(((token_precision < 1) | (token_precision > 5)).any())):
            raise KVWireError("precision map: expected layer codes 0..5 and token codes 1..5, found others")
    segments = _segments(layers, tokens, config.scheme, token_precision, layer_precision)
    payload_len, scale_len = _section_sizes(config, info.heads, info.head_dim, segments)
    if (payload_len, scale_len) != (bd["payload"], bd["scales"]):
        raise KVWireError(f"payload/scales: the dimensions and map imply {payload_len}/{scale_len} bytes, "
                          f"header says {bd['payload']}/{bd['scales']}")
    segments = _with_indices(segments, tokens, token_precision)
    with warnings.catch_warnings():  # codes are read in place from a read-only blob; torch warns it is read-only
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        k, v = _decode_segments(body.read(payload_len + scale_len), config, info, segments, device)
    body.finish()
    positions = torch.from_numpy(indices.astype(numpy.int64))
    return KVPayload(k, v, positions, info.context_len, token_precision, layer_precision)


def _decode_segments(data, config: WireConfig, info: WireInfo, segments: list, device):
    """K and V (L, H, T, D) from the payload and scale sections (`data`), refusing non-finite scales, zero
    points and values."""
    heads, dim, vdtype = info.heads, info.head_dim, VALUE_DTYPES[config.value_dtype]
    sdtype = SCALE_DTYPES[config.scale_dtype]
    # (L, H, T, D), not zeroed: the segments cover every layer's tokens exactly once (see _segments)
    k = torch.empty((info.layers, heads, info.tokens, dim), dtype=vdtype, device=device)
    v = torch.empty_like(k)
    offset, scale_cursor = 0, info.breakdown["payload"]

    def take_scales(count: int, where: str):
        nonlocal scale_cursor
        raw = bytearray(data[scale_cursor:scale_cursor + 2 * count])
        scale_cursor += 2 * count
        values = torch.frombuffer(raw, dtype=sdtype) if count else torch.zeros(0, dtype=sdtype)
        if not all_finite(values):
            raise KVWireError(f"scales ({where}): expected finite scales and zero points, "
                              f"found {float(values[~torch.isfinite(values)][0])}")
        return values.to(device)

    shared = {}
    for code in _shared_codes(segments) if config.granularity == "tensor" else []:
        spec = config.spec(PRECISION_NAMES[code])
        shared[code] = [(take_scales(1, f"{role}, all layers").reshape(1, 1, 1),
                         take_scales(1, f"{role}, all layers").reshape(1, 1, 1) if spec.has_offset else None)
                        for role in "KV"]
    for layer, code, tokens, idx in segments:
        name = PRECISION_NAMES[code]
        spec = config.spec(name)
        count = heads * tokens * dim
        for r, (role, target) in enumerate((("k", k), ("v", v))):
            where = f"{role.upper()}, layer {layer}"
            size = _payload_bytes(name, count)
            codes = _decode_codes(data, offset, size, name, spec, count, vdtype).to(device).reshape(heads, tokens, dim)
            offset += size
            if name == "fp16":
                scale = offset_t = None
            elif shared:
                scale, offset_t = shared[code][r]
            else:
                shape = scale_shape((heads, tokens, dim), spec, role)
                n = int(torch.Size(shape).numel())
                scale = take_scales(n, where).reshape(shape)
                offset_t = take_scales(n, where).reshape(shape) if spec.has_offset else None
            values = dequantize(Quantized(codes, scale, offset_t), spec, vdtype)
            if name in ("fp16", "fp8") and not all_finite(values):  # other codes are finite given finite scales
                raise KVWireError(f"payload ({where}): expected finite values, found NaN or inf {name} codes")
            target[layer][:, idx] = values
    return k, v


def _decode_codes(section, offset: int, size: int, name: str, spec: QuantSpec, count: int, vdtype) -> torch.Tensor:
    """One segment's codes from `section` (bytes [offset, offset + size)). 8- and 4-bit codes are a view of the
    blob, only read (dequantizing makes new tensors); 16-bit values are copied, so they are aligned and the K/V
    the caller fills never aliases the blob. Called inside unpack's filter of torch's read-only buffer warning."""
    if not size:
        return torch.zeros(0, dtype=torch.uint8)
    if name == "fp16":
        return torch.frombuffer(bytearray(section[offset:offset + size]), dtype=torch.uint8).view(vdtype)
    data = torch.frombuffer(section, dtype=torch.uint8, count=size, offset=offset)
    if name in ("int4", "nf4"):
        return unpack_nibbles(data, count, signed=name == "int4" and spec.symmetric)
    if name == "int8" and spec.symmetric:
        return data.view(torch.int8)
    return data


GROUPS = ("drop", "fp16", "int8", "int4", "nf4", "fp8")


def payload_from_groups(k: torch.Tensor, v: torch.Tensor, groups, context_len: int | None = None,
                        layer_precision=None) -> KVPayload:
    """A payload from a caller's per-token precision groups over a whole context: K, V (L, H, T, D) and
    `groups`, T names from GROUPS. 'drop' tokens are left out of the blob; the rest keep their precision.
    `layer_precision` (L names or None per layer) overrides whole layers, e.g. the last N layers in 'fp16'."""
    tokens = k.shape[2]
    if len(groups) != tokens or any(g not in GROUPS for g in groups):
        raise KVWireError(f"groups: expected {tokens} names from {GROUPS}, found {list(groups)[:8]}...")
    keep = torch.tensor([g != "drop" for g in groups], dtype=torch.bool)
    index = keep.nonzero()[:, 0]
    token_precision = torch.tensor([PRECISION_CODES[g] for g in groups if g != "drop"], dtype=torch.uint8)
    layers = None
    if layer_precision is not None:
        if len(layer_precision) != k.shape[0] or any(p not in (None, *PRECISION_CODES) for p in layer_precision):
            raise KVWireError(f"layer_precision: expected {k.shape[0]} entries from {(None, *PRECISION_CODES)}, "
                              f"found {list(layer_precision)}")
        layers = torch.tensor([INHERIT if p is None else PRECISION_CODES[p] for p in layer_precision],
                              dtype=torch.uint8)
    return KVPayload(k[:, :, index.to(k.device)], v[:, :, index.to(v.device)], index,
                     tokens if context_len is None else context_len, token_precision, layers)
