"""KV quantizers: int8 / int4 (symmetric or with zero point), NF4, FP8 (e4m3), and fp16 passthrough.

Tensors are (..., H, T, D) (heads, tokens, head dim). A granularity decides which elements share a scale:

  tensor  one scale for everything            scale (1, ..., 1)
  layer   one per leading index (a layer)     scale (..., 1, 1, 1)
  head    one per head                        scale (..., H, 1, 1)
  token   one per head and block of tokens    scale (..., H, ceil(T/b), 1)
  kivi    keys per channel, values per token  K: (..., H, 1, D), V: (..., H, T, 1)

Scales are stored in fp16 or bf16 and chosen so that values never clip after rounding, which gives the error
bounds in `error_bound`; a scale (or zero point) the scale dtype cannot hold is a KVWireError, never a silent
clip, and dequantized values saturate at the value dtype's finite range instead of overflowing to inf. All work is vectorized over tokens; codes are int8 (int schemes, fp8 bits as uint8
reinterpreted) or uint8 (NF4 indices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ember.errors import KVWireError

SCHEMES = ("fp16", "int8", "int4", "nf4", "fp8")
GRANULARITIES = ("tensor", "layer", "head", "token", "kivi")
SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
BITS = {"fp16": 16, "int8": 8, "int4": 4, "nf4": 4, "fp8": 8}
FP8_MAX = 448.0  # largest finite e4m3fn value

# The NF4 codebook: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero (16 levels).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: scheme, granularity (with token block size), symmetry, scale dtype.

    `symmetric=False` (a zero point per group) applies to int8 / int4; nf4 and fp8 are symmetric by design."""

    scheme: str = "int8"
    granularity: str = "head"
    block_tokens: int = 1
    symmetric: bool = True
    scale_dtype: str = "fp16"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise KVWireError(f"scheme: expected one of {SCHEMES}, found {self.scheme!r}")
        if self.granularity not in GRANULARITIES:
            raise KVWireError(f"granularity: expected one of {GRANULARITIES}, found {self.granularity!r}")
        if not 1 <= self.block_tokens <= 65535:
            raise KVWireError(f"block_tokens: expected 1..65535, found {self.block_tokens}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise KVWireError(f"scale_dtype: expected one of {tuple(SCALE_DTYPES)}, found {self.scale_dtype!r}")

    @property
    def has_offset(self) -> bool:
        return not self.symmetric and self.scheme in ("int8", "int4")


@dataclass
class Quantized:
    """Codes (same shape as the input) with scales and optional offsets (zero points) broadcastable to it."""

    codes: torch.Tensor
    scale: torch.Tensor | None
    offset: torch.Tensor | None = None


def scale_shape(shape: tuple[int, ...], spec: QuantSpec, role: str) -> tuple[int, ...]:
    """Shape of the scale tensor for data of `shape` (..., H, T, D); role is 'k' or 'v' (matters for kivi)."""
    *lead, heads, tokens, dim = shape
    if spec.scheme == "fp16":
        return (0,)
    if spec.granularity == "tensor":
        return (1,) * len(shape)
    if spec.granularity == "layer":
        return (*lead, 1, 1, 1)
    if spec.granularity == "head":
        return (*lead, heads, 1, 1)
    if spec.granularity == "token":
        return (*lead, heads, -(-tokens // spec.block_tokens), 1)
    return (*lead, heads, 1, dim) if role == "k" else (*lead, heads, tokens, 1)


def _expand(scale: torch.Tensor, shape: tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """Broadcast a scale to the data shape (token blocks repeated along T)."""
    if spec.granularity == "token" and spec.block_tokens > 1:
        scale = scale.repeat_interleave(spec.block_tokens, dim=-2)[..., : shape[-2], :]
    return scale.expand(shape)


def _group_reduce(x: torch.Tensor, spec: QuantSpec, role: str, op) -> torch.Tensor:
    """Reduce x (..., H, T, D) with `op` ('amax' / 'amin') over each scale group; the result in float32 (a max or
    min is one of the values, so reducing in x's own dtype and widening after is exact)."""
    shape = x.shape
    reduce = getattr(torch, op)
    if spec.granularity == "tensor":
        return reduce(x).reshape((1,) * len(shape)).float()
    if spec.granularity == "layer":
        return reduce(x, dim=(-3, -2, -1), keepdim=True).float()
    if spec.granularity == "head":
        return reduce(x, dim=(-2, -1), keepdim=True).float()
    if spec.granularity == "kivi":
        return reduce(x, dim=-2 if role == "k" else -1, keepdim=True).float()
    block = spec.block_tokens
    tokens = shape[-2]
    pad = (-tokens) % block
    if pad:  # pad with copies of the last token so padding never changes a block's max / min
        x = torch.cat([x, x[..., -1:, :].expand(*shape[:-2], pad, shape[-1])], dim=-2)
    x = x.reshape(*shape[:-2], (tokens + pad) // block, block * shape[-1])
    return reduce(x, dim=-1, keepdim=True).float()


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of x is finite: one min / max pass (NaN propagates through both), no mask."""
    return not x.numel() or all(math.isfinite(float(bound)) for bound in torch.aminmax(x))


def _scale_range(value: torch.Tensor, scale_dtype: str, what: str) -> torch.finfo:
    """The scale dtype's finfo, once every value is known to be finite and within its range (no silent clip)."""
    info = torch.finfo(SCALE_DTYPES[scale_dtype])
    worst = float(value.abs().max())
    if not math.isfinite(worst) or worst > info.max:
        raise KVWireError(f"{what}: expected finite values with |x| <= {info.max:g} (scale_dtype {scale_dtype}; "
                          f"'bf16' holds larger ones), found {worst:g}")
    return info


def _round_up(value: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Cast positive float32 scales to the scale dtype without ever rounding below the input (or to zero)."""
    info = _scale_range(value, scale_dtype, "scale")
    return (value * (1 + 2 * info.eps)).clamp(min=info.tiny, max=info.max).to(SCALE_DTYPES[scale_dtype])


def _round_down(value: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Cast float32 zero points to the scale dtype with a result never above the input."""
    info = _scale_range(value, scale_dtype, "zero point")
    return (value - value.abs() * 2 * info.eps - info.tiny).clamp(min=-info.max).to(SCALE_DTYPES[scale_dtype])


def group_stats(x: torch.Tensor, spec: QuantSpec, role: str) -> tuple[torch.Tensor, ...]:
    """The group statistics a scale is derived from: (low, high) with a zero point, else (peak |x|,)."""
    if spec.has_offset:
        return _group_reduce(x, spec, role, "amin"), _group_reduce(x, spec, role, "amax")
    return (_group_reduce(x.abs(), spec, role, "amax"),)


def quantize(x: torch.Tensor, spec: QuantSpec, role: str = "k", stats: tuple | None = None) -> Quantized:
    """Quantize x (..., H, T, D), already in its value dtype (fp16 / bf16 / fp32).

    `stats` overrides the group statistics (see `group_stats`) so that several tensors share one scale.
    The fp16 scheme keeps values as they are (no scale). Non-finite values, or a scale or zero point beyond the
    scale dtype's range, raise KVWireError.
    """
    if spec.scheme == "fp16":
        return Quantized(x, None)
    # worked on in place below: one contiguous float32 buffer, never the caller's x
    xf = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    stats = group_stats(x, spec, role) if stats is None else tuple(s.float() for s in stats)
    if spec.has_offset:
        levels = 2 ** BITS[spec.scheme] - 1
        low = _round_down(stats[0], spec.scale_dtype)
        high = stats[1]
        scale = _round_up((high - low.float()) / levels, spec.scale_dtype)
        shifted = xf.sub_(_expand(low.float(), x.shape, spec)).div_(_expand(scale.float(), x.shape, spec))
        codes = shifted.round_().clamp_(0, levels).to(torch.uint8)
        return Quantized(codes, scale, low)
    peak = stats[0]
    if spec.scheme in ("int8", "int4"):
        qmax = 2 ** (BITS[spec.scheme] - 1) - 1
        scale = _round_up(peak / qmax, spec.scale_dtype)
        codes = xf.div_(_expand(scale.float(), x.shape, spec)).round_().clamp_(-qmax, qmax).to(torch.int8)
    elif spec.scheme == "nf4":
        scale = _round_up(peak, spec.scale_dtype)
        normed = xf.div_(_expand(scale.float(), x.shape, spec))  # in [-1, 1]
        levels = NF4_LEVELS.to(x.device)
        # nearest level via midpoints: searchsorted is vectorized and needs no (.., 16) temporary
        midpoints = (levels[1:] + levels[:-1]) / 2
        codes = torch.searchsorted(midpoints, normed).to(torch.uint8)
    else:  # fp8 e4m3
        scale = _round_up(peak / FP8_MAX, spec.scale_dtype)
        scaled = xf.div_(_expand(scale.float(), x.shape, spec)).clamp_(-FP8_MAX, FP8_MAX)
        codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    return Quantized(codes, scale)


def dequantize(q: Quantized, spec: QuantSpec, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Reconstruct values in `dtype` from codes and scales, saturating at its finite range."""
    if spec.scheme == "fp16":
        return q.codes.to(dtype)
    shape = q.codes.shape
    scale = _expand(q.scale.float(), shape, spec)
    if spec.has_offset:
        values = (q.codes * scale).add_(_expand(q.offset.float(), shape, spec))  # codes widen to float32 exactly
    elif spec.scheme in ("int8", "int4"):
        values = q.codes * scale
    elif spec.scheme == "nf4":
        values = NF4_LEVELS.to(q.codes.device)[q.codes.long()] * scale
    else:
        values = q.codes.view(torch.float8_e4m3fn).float() * scale
    limit = torch.finfo(dtype).max  # a code times its rounded-up scale may land just past the range: saturate
    return values.clamp_(-limit, limit).to(dtype)


def fake_quant(x: torch.Tensor, spec: QuantSpec, role: str = "k", dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Cast to the value dtype, quantize, dequantize, all in memory: the reference the wire must reproduce."""
    x = x.to(dtype)
    return dequantize(quantize(x, spec, role), spec, dtype)


def error_bound(x: torch.Tensor, q: Quantized, spec: QuantSpec) -> torch.Tensor:
    """Per-element bound on |x - dequantize(q)| (before the final cast to the value dtype).

    int: scale / 2. NF4: half the widest codebook gap times the scale. FP8 e4m3: |x| / 16 (3 mantissa bits)
    plus the subnormal step (2^-9 scale) / 2. fp16: 0.
    """
    if spec.scheme == "fp16":
        return torch.zeros_like(x, dtype=torch.float32)
    scale = _expand(q.scale.float(), x.shape, spec)
    if spec.scheme in ("int8", "int4"):
        return scale / 2
    if spec.scheme == "nf4":
        return scale * (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max().item() / 2
    return x.float().abs() / 16 + scale * 2.0 ** -10


def pack_nibbles(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Flatten 4-bit codes and pack two per byte, low nibble first; an odd count pads the last high nibble
    with 0. Signed codes (-7..7) are stored offset by 8. Returns uint8 (ceil(n/2),)."""
    flat = codes.reshape(-1).to(torch.int16)
    if signed:
        flat = flat + 8
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, count: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (count,) codes as int8 (signed) or uint8."""
    packed = packed.to(torch.int16)
    flat = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1)[:count]
    return (flat - 8).to(torch.int8) if signed else flat.to(torch.uint8)
