"""KVWire layer groups: one message made of several KVWire v1 blobs, each carrying a subset of a cache's layers
with its own tokens and precisions.

A v1 blob sends one token set for every layer; a method that sends all of a context's tokens in some layers
and a single token in the others (the KVComm-like baseline) needs one token set per group of layers.
Layout (little-endian; docs/kvwire.md, "Layer groups"):

  header     12 bytes   magic b"KVWG", version u16, layers u16 (L), groups u16 (G), reserved u16 (zero)
  layer map  L bytes    the group of each layer, 0..G-1, or 255 where the layer is not sent
  lengths    4*G bytes  the byte length of each group's blob (u32)
  blobs                 G KVWire v1 blobs in group order; blob g holds the layers mapped to g, ascending
  crc32      4 bytes    CRC-32 of everything before it

The message's size is its length: every header, map, index, scale and checksum counts.
"""

from __future__ import annotations

import struct
import zlib

import torch

from ember.errors import KVWireError
from ember.kv.wire import KVPayload, WireConfig, inspect, pack, unpack

MAGIC = b"KVWG"
VERSION = 1
HEADER = struct.Struct("<4sHHHH")  # 12 bytes
NOT_SENT = 255
CHECKSUM_BYTES = 4


def is_layered(message: bytes) -> bool:
    """True when `message` is a layer-group message (else a plain KVWire v1 blob)."""
    return bytes(message[:4]) == MAGIC


def pack_groups(groups: list[tuple[list[int], KVPayload]], config: WireConfig, layers: int) -> bytes:
    """One message of `groups` (layer indices, payload of those layers (L_g, H, T_g, D)) over a cache of
    `layers` layers, each group packed as a KVWire v1 blob at `config` (a layer in no group is not sent)."""
    if not groups or len(groups) >= NOT_SENT:
        raise KVWireError(f"groups: expected 1..{NOT_SENT - 1}, found {len(groups)}")
    owner = [NOT_SENT] * layers
    for g, (indices, payload) in enumerate(groups):
        if list(indices) != sorted(set(indices)) or not indices or not 0 <= indices[0] <= indices[-1] < layers:
            raise KVWireError(f"group {g}: expected distinct ascending layers in [0, {layers}), found {list(indices)}")
        if payload.shape[0] != len(indices):
            raise KVWireError(f"group {g}: expected a payload of {len(indices)} layers, found {payload.shape[0]}")
        for layer in indices:
            if owner[layer] != NOT_SENT:
                raise KVWireError(f"layer {layer}: expected in one group, found in groups {owner[layer]} and {g}")
            owner[layer] = g
    shapes = {(p.shape[1], p.shape[3], p.context_len) for _, p in groups}
    if len(shapes) != 1:
        raise KVWireError(f"groups: expected one (heads, head dim, context length), found {sorted(shapes)}")
    blobs = [pack(payload, config) for _, payload in groups]
    body = b"".join([HEADER.pack(MAGIC, VERSION, layers, len(groups), 0), bytes(owner),
                     struct.pack(f"<{len(blobs)}I", *map(len, blobs)), *blobs])
    return body + struct.pack("<I", zlib.crc32(body))


def _parse(message: bytes) -> tuple[int, list[int], list[memoryview]]:
    """(layers, group of each layer, each group's blob) after every length and the checksum are checked."""
    if len(message) < HEADER.size + CHECKSUM_BYTES:
        raise KVWireError(f"layer groups: expected at least {HEADER.size + CHECKSUM_BYTES} bytes, found {len(message)}")
    magic, version, layers, count, reserved = HEADER.unpack_from(message, 0)
    if magic != MAGIC or version != VERSION or reserved:
        raise KVWireError(f"layer groups header: expected magic {MAGIC!r} version {VERSION}, reserved 0, found "
                          f"{bytes(magic)!r} version {version}, reserved {reserved}")
    start = HEADER.size + layers + 4 * count
    if not 0 < count < NOT_SENT or len(message) < start + CHECKSUM_BYTES:
        raise KVWireError(f"layer groups: {count} groups over {layers} layers do not fit in {len(message)} bytes")
    (stored,) = struct.unpack_from("<I", message, len(message) - CHECKSUM_BYTES)
    if zlib.crc32(memoryview(message)[:-CHECKSUM_BYTES]) != stored:
        raise KVWireError("layer groups checksum: CRC-32 mismatch (the message is corrupt)")
    owner = list(message[HEADER.size:HEADER.size + layers])
    if any(g != NOT_SENT and g >= count for g in owner):
        raise KVWireError(f"layer map: expected groups 0..{count - 1} or {NOT_SENT}, found {sorted(set(owner))}")
    lengths = struct.unpack_from(f"<{count}I", message, HEADER.size + layers)
    if start + sum(lengths) + CHECKSUM_BYTES != len(message):
        raise KVWireError(f"layer groups: blobs of {sum(lengths)} bytes, expected {len(message) - start - 4}")
    blobs, cursor = [], start
    for length in lengths:
        blobs.append(memoryview(message)[cursor:cursor + length])
        cursor += length
    return layers, owner, blobs


def unpack_groups(message: bytes, device="cpu") -> tuple[int, list[tuple[list[int], KVPayload]]]:
    """(layers, [(layer indices, decoded payload)] per group) of a layer-group message."""
    layers, owner, blobs = _parse(message)
    groups = []
    for g, blob in enumerate(blobs):
        indices = [layer for layer, o in enumerate(owner) if o == g]
        payload = unpack(bytes(blob), device=device)
        if payload.shape[0] != len(indices):
            raise KVWireError(f"group {g}: the layer map gives {len(indices)} layers, its blob holds {payload.shape[0]}")
        groups.append((indices, payload))
    shapes = {(p.shape[1], p.shape[3], p.context_len) for _, p in groups}
    if len(shapes) != 1:
        raise KVWireError(f"layer groups: expected one (heads, head dim, context length), found {sorted(shapes)}")
    return layers, groups


def breakdown(message: bytes) -> dict:
    """Bytes by section over every group's blob, the container's own header, map and lengths counted in
    'header' and its CRC in 'checksum'; 'total' is the message's length."""
    layers, _, blobs = _parse(message)
    out = {"header": HEADER.size + layers + 4 * len(blobs), "checksum": CHECKSUM_BYTES}
    for blob in blobs:
        for name, size in inspect(bytes(blob)).breakdown.items():
            if name != "total":
                out[name] = out.get(name, 0) + size
    out["total"] = len(message)
    return out


def assemble(layers: int, groups: list[tuple[list[int], KVPayload]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The receiver's view of decoded groups: K/V (L, 2, H, m, D) over the union of the groups' positions
    (m,) ascending, and which layer sees which of them (L, m) bool (False: a token that layer was not sent,
    its K/V left zero). A layer in no group sees none."""
    positions = torch.unique(torch.cat([p.positions for _, p in groups]))  # (m,) sorted
    first = groups[0][1]
    heads, dim = first.shape[1], first.shape[3]
    kv = torch.zeros(layers, 2, heads, len(positions), dim, dtype=first.k.dtype, device=first.k.device)
    visible = torch.zeros(layers, len(positions), dtype=torch.bool)
    for indices, payload in groups:
        columns = torch.searchsorted(positions, payload.positions)  # (T_g,) where the group's tokens sit
        rows = torch.tensor(indices)
        kv[rows[:, None], 0, :, columns.to(kv.device)] = payload.k.transpose(1, 2)
        kv[rows[:, None], 1, :, columns.to(kv.device)] = payload.v.transpose(1, 2)
        visible[rows[:, None], columns[None]] = True
    return kv, positions, visible
