"""Context transfer of K/V: the sharer prefills a context, picks and quantizes its tokens under a byte cap,
packs them with KVWire; the receiver unpacks the blob and attends to it before its question.

Nothing is estimated: the bytes are `len(blob)`, the receiver decodes the very blob that was packed, and a
cap the blob would exceed sends fewer tokens (or nothing at all).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ember.engine.past import PastKV, concat_past
from ember.errors import CommError
from ember.kv.allocate import LADDER, allocate, payload_for
from ember.kv.select import SELECTION_MODES, token_scores
from ember.kv.layered import assemble, is_layered, unpack_groups
from ember.kv.wire import WireConfig, inspect, layer_bytes, pack, unpack

UNLIMITED = 1 << 62  # the cap of a full transfer


@dataclass(frozen=True)
class KVMethod:
    """How a context's K/V is cut to a cap: a selection mode and the precisions a token may take besides
    drop (one precision: token selection; several: rate-distortion allocation), on a KVWire config."""

    selection: str = "front"
    precisions: tuple[str, ...] = ("int8",)
    granularity: str = "token"
    block_tokens: int = 1

    def __post_init__(self):
        if self.selection not in SELECTION_MODES:
            raise CommError(f"selection: expected one of {SELECTION_MODES}, found {self.selection!r}")
        if not self.precisions or any(p not in LADDER[1:] for p in self.precisions):
            raise CommError(f"precisions: expected one or more of {LADDER[1:]}, found {list(self.precisions)}")

    @property
    def name(self) -> str:
        kind = "rd" if len(self.precisions) > 1 else "kv"
        return f"{kind}:{self.selection}:{'+'.join(self.precisions)}"

    def wire_config(self, scheme: str) -> WireConfig:
        return WireConfig(scheme, self.granularity, self.block_tokens)


@dataclass
class Encoded:
    """What a sharer sends for one sample: the blob (None when nothing fits), its size and breakdown, each
    context token's precision (`groups`; 'drop' when not sent; a layer-wise method gives a token's lowest
    precision over the layers that carry it, 'drop' when none does),
    the select / encode times (ms), the payload + scale bytes of each layer, and method-specific counts
    (`extra`, e.g. the layers a layer-wise method sent whole)."""

    blob: bytes | None
    nbytes: int
    groups: list[str]
    breakdown: dict = field(default_factory=dict)
    select_ms: float = 0.0
    encode_ms: float = 0.0
    layer_bytes: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def tokens_sent(self) -> int:
        return sum(g != "drop" for g in self.groups)


def sharer_context_kv(engine, head: list[int], context: list[int]) -> torch.Tensor:
    """The sharer's K/V (L, 2, H, c, D) of the context tokens, read after the template head (the positions a
    receiver reading the whole prompt would give them)."""
    if not context:
        raise CommError("context: expected at least one token, found none")
    kv, _ = engine.prefill_kv(head + context, use_prefix_cache=False)
    return kv[:, :, :, len(head):]


def encode_context(kv: torch.Tensor, method: KVMethod, cap: int | None, seed: int = 0, **score_inputs) -> Encoded:
    """Select / allocate the context's tokens under `cap` bytes (None: no cap) and pack them. `score_inputs`
    (projected_v, receiver_v) feed the projection-based selection modes."""
    k, v = kv[:, 0], kv[:, 1]  # (L, H, c, D)
    layers, heads, tokens, dim = k.shape
    limit = UNLIMITED if cap is None else cap
    began = time.perf_counter()
    scores = token_scores(method.selection, k, v, seed=seed, **score_inputs)
    allocation = allocate(scores, ("drop",) + method.precisions, method.wire_config(method.precisions[-1]),
                          layers, heads, dim, limit, tokens)
    selected = time.perf_counter()
    if not allocation.kept:
        return Encoded(None, 0, allocation.groups, {}, 1e3 * (selected - began), 0.0)
    payload, scheme = payload_for(k, v, allocation.groups, tokens)
    blob = pack(payload, method.wire_config(scheme))
    packed = time.perf_counter()
    if len(blob) != allocation.nbytes or len(blob) > limit:
        raise CommError(f"KVWire blob: expected {allocation.nbytes} bytes within the cap {cap}, found {len(blob)}")
    return Encoded(blob, len(blob), allocation.groups, inspect(blob).breakdown, 1e3 * (selected - began),
                   1e3 * (packed - selected), layer_bytes(payload, method.wire_config(scheme)))


def receive(blob: bytes | None, head_kv: torch.Tensor, context_len: int, device, dtype, projector=None,
            sharer_head: int = 0) -> tuple[PastKV, float, float]:
    """The receiver's past: its own head K/V (L, 2, H, h, D) then the decoded context tokens, the question
    starting after the whole context; the decode and projection times (ms). No blob: the head alone.
    A `projector` (ember.comm.projector) maps the decoded sharer K/V into the receiver's space, the keys
    re-rotated from sharer position `sharer_head` + i to receiver position h + i of context token i.
    A layer-group message (ember.kv.layered) gives each layer only its own tokens (the past's layer mask)."""
    began = decoded = time.perf_counter()
    next_position = head_kv.shape[3] + context_len
    parts = [PastKV(head_kv, next_position)]
    if blob is not None and is_layered(blob):
        if projector is not None:
            raise CommError("layer-group messages are same-model transfers; this pair goes through a projector")
        layers, groups = unpack_groups(blob, device=device)
        kv, _, seen = assemble(layers, groups)  # (L, 2, H, m, D), (L, m)
        _check_same_shape(kv, head_kv)
        decoded = time.perf_counter()
        parts.append(PastKV(kv.to(dtype), next_position, seen))
    elif blob is not None:
        payload = unpack(blob, device=device)
        kv = torch.stack([payload.k, payload.v], dim=1)  # (L, 2, H, m, D)
        decoded = time.perf_counter()
        if projector is None:
            _check_same_shape(kv, head_kv)
        else:
            positions = payload.positions.to(device)[None]  # (1, m) context indices of the kept tokens
            with torch.no_grad():
                kv = projector(kv[:, :, None], sharer_head + positions, head_kv.shape[3] + positions)[:, :, 0]
        parts.append(PastKV(kv.to(dtype), next_position))
    past = concat_past(parts)  # the head seen by every layer
    ended = time.perf_counter()
    return past, 1e3 * (decoded - began), 1e3 * (ended - decoded)


def _check_same_shape(kv: torch.Tensor, head_kv: torch.Tensor) -> None:
    """Raise CommError unless decoded K/V (L, 2, H, m, D) fits the receiver's cache (L, 2, H, h, D)."""
    found, expected = (kv.shape[0], kv.shape[2], kv.shape[4]), (head_kv.shape[0], head_kv.shape[2], head_kv.shape[4])
    if found != expected:
        raise CommError(f"received K/V: expected the receiver's (layers, KV heads, head dim) {expected}, found {found}")
