"""Rate-distortion allocation: each context token goes to the wire dropped or at one of a few precisions,
under a per-sample byte cap that counts everything in the blob (header, indices, map, payload, scales, CRC).

Tokens are weighted by rank (the best-scored token weighs T, the worst 1). Moving a token one precision up
its ladder (drop -> int4 -> int8 -> fp16, among the candidates) gains weight x (distortion drop) and costs
the bytes it adds; the greedy takes steps from the best gain per byte down, a token's steps in order, each
only if the blob still fits (priced exactly, from per-precision counts); ties go to the earlier token and the
lower step. With one precision besides drop, every step has the same cost, so the steps come in score order:
the allocation is the top tokens that fit, exactly token selection at that cap.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ember.errors import CommError
from ember.kv.select import ranking
from ember.kv.wire import KVPayload, PRECISION_CODES, WireConfig, size_for_counts

LADDER = ("drop", "int4", "int8", "fp16")
# Relative squared error of a precision (a symmetric uniform quantizer's step squared; drop loses everything).
DISTORTION = {"drop": 1.0, "int4": 1 / 7 ** 2, "int8": 1 / 127 ** 2, "fp16": 0.0}


@dataclass
class Allocation:
    """Per token (T names from `candidates`) and the exact blob size they make."""

    groups: list[str]
    nbytes: int

    @property
    def kept(self) -> int:
        return sum(g != "drop" for g in self.groups)


def check_candidates(candidates) -> tuple[str, ...]:
    """Candidates in ladder order; 'drop' and at least one precision are required."""
    chosen = tuple(name for name in LADDER if name in candidates)
    if "drop" not in candidates or len(chosen) < 2 or len(chosen) != len(set(candidates)):
        raise CommError(f"RD candidates: expected 'drop' and one or more of {LADDER[1:]}, found {list(candidates)}")
    return chosen


def allocate(scores: torch.Tensor, candidates, config: WireConfig, layers: int, heads: int, head_dim: int,
             cap: int, context_len: int) -> Allocation:
    """Assign each of T tokens (scores (T,)) a candidate so the KVWire blob fits in `cap` bytes."""
    ladder = check_candidates(candidates)
    tokens = len(scores)
    has_map = len(ladder) > 2
    counts = dict.fromkeys(ladder[1:], 0)

    def size(trial: dict) -> int:
        return size_for_counts(config, layers, heads, head_dim, trial, has_map, context_len - 1)

    levels = [0] * tokens  # index into ladder per token
    if size(counts) > cap:
        return Allocation(["drop"] * tokens, 0)
    weight = torch.empty(tokens, dtype=torch.float64)
    weight[ranking(scores)] = torch.arange(tokens, 0, -1, dtype=torch.float64)
    unit = {name: size(dict(counts, **{name: 1})) - size(counts) for name in ladder[1:]}
    cost = [0] + [unit[name] for name in ladder[1:]]
    gains = [DISTORTION[a] - DISTORTION[b] for a, b in zip(ladder, ladder[1:])]
    heap = [(-float(weight[t]) * gains[0] / (cost[1] - cost[0]), t, 1) for t in range(tokens)]
    heapq.heapify(heap)
    while heap:
        _, token, level = heapq.heappop(heap)
        if levels[token] != level - 1:
            continue
        trial = dict(counts)
        if level > 1:
            trial[ladder[level - 1]] -= 1
        trial[ladder[level]] += 1
        if size(trial) > cap:
            continue  # this step does not fit; the token stays where it is
        counts, levels[token] = trial, level
        if level + 1 < len(ladder):
            ratio = float(weight[token]) * gains[level] / max(cost[level + 1] - cost[level], 1)
            heapq.heappush(heap, (-ratio, token, level + 1))
    used = {name for name, count in counts.items() if count}
    final = size_for_counts(config, layers, heads, head_dim, counts, len(used) > 1, context_len - 1)
    return Allocation([ladder[level] for level in levels], final if used else 0)


def payload_for(k: torch.Tensor, v: torch.Tensor, groups: list[str], context_len: int) -> tuple[KVPayload, str]:
    """The KVPayload of the kept tokens of K, V (L, H, T, D) and the header scheme: with one precision kept,
    no map (the header's scheme says it); with several, a per-token map."""
    keep = [i for i, g in enumerate(groups) if g != "drop"]
    used = sorted({groups[i] for i in keep}, key=LADDER.index)
    index = torch.tensor(keep, dtype=torch.long)
    kept_k, kept_v = k[:, :, index.to(k.device)], v[:, :, index.to(v.device)]
    if len(used) <= 1:
        return KVPayload(kept_k, kept_v, index, context_len), (used[0] if used else "int8")
    codes = torch.tensor([PRECISION_CODES[groups[i]] for i in keep], dtype=torch.uint8)
    return KVPayload(kept_k, kept_v, index, context_len, token_precision=codes), used[-1]
