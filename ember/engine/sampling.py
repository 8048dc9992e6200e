"""Sampling parameters and a batched, counter-based sampler.

Randomness comes from a hash of (row seed, step, token id), not from a stateful generator, so a request's
samples depend only on its seed: the same seed gives the same tokens whatever else shares the batch, on any
device. Sampling is Gumbel-max over the temperature-scaled, top-k / top-p filtered logits, which draws exactly
from the renormalized filtered distribution.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ember.errors import GenerationError

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's candidates.

    temperature 0 means greedy. top_k 0 and top_p 1 disable those filters. `stop` strings end a candidate
    when its text contains one that completed after `min_tokens` tokens (the text is cut before it); a stop
    string that is exactly a special token's text (e.g. "<|im_end|>", which decoding skips) matches that token.
    `stop_token_ids` (plus the tokenizer's eos unless `ignore_eos`) end it with that token kept in `token_ids`.
    `logprobs` > 0 also returns that many top logprobs per step. `seed` None draws a fresh seed, reported in the output.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0
    seed: int | None = None

    def __post_init__(self):
        kinds = [("temperature", is_number, "a number"), ("top_p", is_number, "a number"),
                 ("top_k", is_integer, "an integer"), ("max_tokens", is_integer, "an integer"),
                 ("min_tokens", is_integer, "an integer"), ("logprobs", is_integer, "an integer"),
                 ("ignore_eos", lambda v: isinstance(v, bool), "True or False"),
                 ("seed", lambda v: v is None or is_integer(v), "an integer or None")]
        for name, ok, expected in kinds:
            if not ok(getattr(self, name)):
                value = getattr(self, name)
                raise GenerationError(f"SamplingParams.{name}: expected {expected}, found {value!r} "
                                      f"({type(value).__name__})")
        checks = [
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0"),
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "in [0, max_tokens]"),
            ("logprobs", self.logprobs >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise GenerationError(f"SamplingParams.{name}: expected {expected}, found {getattr(self, name)!r}")
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise GenerationError(f"SamplingParams.{name}: expected a tuple, found {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError(f"SamplingParams.stop: expected non-empty strings, found {list(self.stop)!r}")
        bad = [t for t in self.stop_token_ids if not is_integer(t) or t < 0]
        if bad:
            raise GenerationError(f"SamplingParams.stop_token_ids: expected integer token ids >= 0, found {bad}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def is_integer(value) -> bool:
    """An integer that is not a bool (True is an int to Python, never a count or a token id here)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def splitmix64(value: int) -> int:
    """A 64-bit mixing function on Python ints (derives per-candidate seeds)."""
    value = (value + 0x9E3779B97F4A7C15) & _M64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _M64
    return value ^ (value >> 31)


def candidate_seed(request_seed: int, candidate: int) -> int:
    """Independent 63-bit seed for candidate j of a request."""
    return splitmix64(splitmix64(request_seed & _M64) ^ candidate) >> 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Integer hash of int64 tensors holding 32-bit values; multipliers < 2**31 so products stay < 2**63."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def uniform_noise(seeds: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniforms in (0, 1), float64 (B, V), a pure function of (seed, step, token id); `step` is one int or
    one per row (B,)."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32  # (B,)
    row = _mix32(_mix32(lo) ^ hi)
    row = _mix32(row ^ ((step * 0x9E3779B9) & _M32))  # (B,)
    tokens = _mix32(torch.arange(vocab, device=seeds.device, dtype=torch.long) ^ 0x5BD1E995)  # (V,)
    bits = _mix32(row[:, None] ^ tokens[None, :])  # (B, V)
    return (bits.double() + 0.5) / 2.0**32


@dataclass
class RowKnobs:
    """Per-row sampling knobs as device tensors (B,), with filter switches decided once per batch."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    use_top_k: bool
    use_top_p: bool
    num_top: int

    @classmethod
    def build(cls, rows: list[tuple[SamplingParams, int]], device) -> "RowKnobs":
        """Knobs for rows given as (params, row seed) pairs."""
        params = [p for p, _ in rows]
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            seeds=torch.tensor([seed for _, seed in rows], dtype=torch.long, device=device),
            use_top_k=any(p.top_k > 0 for p in params),
            use_top_p=any(p.top_p < 1 for p in params),
            num_top=max(p.logprobs for p in params),
        )


@dataclass
class SampleBatch:
    """One step's draw: chosen tokens (B,), their logprobs (B,), optional top-k ids and logprobs (B, k)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def sample(logits: torch.Tensor, knobs: RowKnobs, step: int | torch.Tensor,
           banned: torch.Tensor | None = None) -> SampleBatch:
    """Draw one token per row from logits (B, V) with the rows' knobs at decode step `step` (one int, or (B,)
    per row: each row's own draw index).

    `banned` (B, V) marks tokens a row may not draw (e.g. stop tokens before min_tokens), greedy rows included.
    Returned logprobs are the model's (log-softmax of the raw logits), not of the filtered distribution.
    """
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)
    greedy = knobs.temperature == 0
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # <= 0: a tiny temperature cannot overflow to +inf
    scaled = shifted / torch.where(greedy, 1.0, knobs.temperature)[:, None]
    if banned is not None:
        logits = logits.masked_fill(banned, -math.inf)
        scaled = scaled.masked_fill(banned, -math.inf)
    scaled = _filter(scaled, knobs)
    gumbel = -torch.log(-torch.log(uniform_noise(knobs.seeds, step, logits.shape[-1]))).float()  # (B, V)
    drawn = torch.argmax(scaled + gumbel, dim=-1)
    tokens = torch.where(greedy, torch.argmax(logits, dim=-1), drawn)  # (B,)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    batch = SampleBatch(tokens, chosen)
    if knobs.num_top:
        batch.top_logprobs, batch.top_ids = logprobs.topk(knobs.num_top, dim=-1)
    return batch


def _filter(scaled: torch.Tensor, knobs: RowKnobs) -> torch.Tensor:
    """Mask (to -inf) logits outside each row's top-k and top-p nucleus. Skips the sort when both are off."""
    if not (knobs.use_top_k or knobs.use_top_p):
        return scaled
    ordered, order = scaled.sort(dim=-1, descending=True)  # (B, V)
    vocab = scaled.shape[-1]
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    drop = torch.zeros_like(ordered, dtype=torch.bool)
    if knobs.use_top_k:
        drop |= rank >= torch.where(knobs.top_k > 0, knobs.top_k, vocab)[:, None]
    if knobs.use_top_p:
        probs = torch.softmax(ordered.masked_fill(drop, -math.inf), dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop |= before >= knobs.top_p[:, None]
    drop[:, 0] = False  # the most likely token always survives
    return scaled.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
