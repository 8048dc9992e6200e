"""What the sharer sends, computed live or kept on disk: per item, its K/V encoded for a method at a cap (a
KVWire blob and what it cost), and its one-sentence hint.

`SharerSide` computes messages with the sharer engine (the simultaneous setting: both models loaded).
`StoredMessages` keeps them in a folder (`wire_blobs/`): a sequential run computes every message with the
sharer first, saves it, unloads the sharer, and the receiver then reads the folder; a receiver that crashes
resumes from the saved blobs without the sharer. Blob files have stable names (`<item>/<method>@<cap>.kvw`)
with a JSON sidecar (sizes, times, the per-token precision groups, the blob's sha256) and are written
atomically; a blob that does not match its sidecar is an error, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.comm.align import same_tokenizer, sharer_parts
from ember.comm.items import CommItem
from ember.comm.layer_baselines import (KVCommMethod, QKVCommMethod, attention_mass, encode_kvcomm, encode_qkvcomm,
                                        layer_scores)
from ember.comm.text import write_hints
from ember.comm.transfer import Encoded, KVMethod, encode_context, sharer_context_kv
from ember.errors import CommError
from ember.report import atomic_write

GROUP_CODES = {"drop": "-", "int4": "4", "int8": "8", "fp16": "h"}
GROUP_NAMES = {code: name for name, code in GROUP_CODES.items()}


@dataclass
class Sent:
    """One encoded message and what the sharer spent on it: its context prefill (ms), the template head it
    read the context after (tokens; the projector re-rotates from there), and the context's token count."""

    encoded: Encoded
    sharer_ms: float
    sharer_head: int
    context_tokens: int


def cache_shape(engine) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of an engine's cache."""
    config = engine.model.config
    return config.num_layers, config.num_kv_heads, config.head_dim


class SharerSide:
    """Messages computed with the sharer engine; K/V of an item is prefilled once and reused across methods
    and caps. With `receiver_tokenizer` of another family, the sharer reads the context aligned to it (one
    token per receiver token, `sharer_parts`). `projector` (receiver-side module) feeds proj_vnorm scoring,
    computed on the sharer's side.
    `calibration` items (never evaluated ones) rank the layers of the KVComm-like method, once."""

    def __init__(self, sharer, projector=None, seed: int = 0, hint_max_tokens: int = 64,
                 calibration: list[CommItem] = (), receiver_tokenizer=None):
        if sharer is None or sharer.tokenizer is None:
            raise CommError("sharer: expected an engine with a tokenizer, found none")
        self.sharer, self.projector, self.seed, self.hint_max_tokens = sharer, projector, seed, hint_max_tokens
        self.receiver_tokenizer = receiver_tokenizer or sharer.tokenizer  # the context's tokens are the receiver's
        self.calibration = list(calibration)
        self.cache_shape = cache_shape(sharer)
        # one tokenizer (and one cache shape): the K/V moves without a projector
        self.one_tokenizer = same_tokenizer(self.receiver_tokenizer, sharer.tokenizer)
        self._kv: dict[str, tuple[torch.Tensor, int, float]] = {}
        self._layer_scores = None

    def _context_kv(self, item: CommItem) -> tuple[torch.Tensor, int, float]:
        """The sharer's K/V (L, 2, H, c, D) of the item's context, its template head length and prefill ms."""
        if item.item_id not in self._kv:
            parts = sharer_parts(self.receiver_tokenizer, self.sharer.tokenizer, item.context, item.question)
            began = time.perf_counter()
            kv = sharer_context_kv(self.sharer, parts.head, parts.context)
            self._kv[item.item_id] = (kv, len(parts.head), 1e3 * (time.perf_counter() - began))
        return self._kv[item.item_id]

    def encode(self, item: CommItem, method: KVMethod | KVCommMethod | QKVCommMethod, cap: int | None,
               receiver_head: int) -> Sent:
        """The item's context K/V selected / allocated under `cap` and packed (`receiver_head`: the length of
        the receiver's template head, where proj_vnorm places the projected tokens)."""
        kv, head, prefill_ms = self._context_kv(item)
        if isinstance(method, KVCommMethod):
            encoded = encode_kvcomm(kv, method, cap, self.layer_scores())
        elif isinstance(method, QKVCommMethod):
            encoded = encode_qkvcomm(kv, method, cap, self.seed)
        else:
            encoded = encode_context(kv, method, cap, seed=self.seed,
                                     **self._score_inputs(method, kv, head, receiver_head))
        return Sent(encoded, prefill_ms, head, kv.shape[3])

    def layer_scores(self):
        """The KVComm-like layer ranking (L,), from the calibration items' attention mass (computed once)."""
        if self._layer_scores is None:
            if not self.calibration:
                raise CommError("kvcomm: expected calibration items to rank the layers, found none (pass "
                                "SharerSide(calibration=...))")
            self._layer_scores = layer_scores(attention_mass(self.sharer, self.calibration))
        return self._layer_scores

    def _score_inputs(self, method: KVMethod, kv: torch.Tensor, head: int, receiver_head: int) -> dict:
        """proj_vnorm's input: the sharer's V projected into the receiver's space (L_r, H_r, c, D_r)."""
        if method.selection != "proj_vnorm" or self.projector is None:
            return {}
        index = torch.arange(kv.shape[3], device=kv.device)[None]  # (1, c)
        with torch.no_grad():
            projected = self.projector(kv[:, :, None], head + index, receiver_head + index)  # (L_r, 2, 1, H_r, c, D_r)
        return {"projected_v": projected[:, 1, 0]}

    def hints(self, items: list[CommItem]) -> dict[str, tuple[str, float]]:
        """item id -> (the sharer's greedy one-sentence hint, its share of the batch's generation ms)."""
        texts, timings = write_hints(self.sharer, [i.context for i in items], [i.question for i in items],
                                     self.hint_max_tokens)
        share = 1e3 * timings["total"] / max(len(items), 1)
        return {item.item_id: (text, share) for item, text in zip(items, texts)}

    def release(self) -> None:
        """Forget the prefilled K/V (before the sharer is unloaded)."""
        self._kv.clear()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "-", name)


class StoredMessages:
    """Messages kept in `folder`: read when there, else computed with `source` (a SharerSide) and saved.
    Without a source, a missing message is a CommError naming the file."""

    def __init__(self, folder, source: SharerSide | None = None):
        self.folder, self.source = Path(folder), source
        info_path = self.folder / "source.json"
        if source is not None:
            info = {"cache_shape": list(source.cache_shape), "one_tokenizer": source.one_tokenizer}
            if info_path.exists() and json.loads(info_path.read_text()) != info:
                raise CommError(f"{info_path}: blobs of another sharer are stored here (expected {info}, found "
                                f"{info_path.read_text().strip()})")
            atomic_write(info_path, json.dumps(info) + "\n")
        elif not info_path.exists():
            raise CommError(f"{self.folder}: expected stored messages (source.json), found none; run the sharer "
                            f"pass first")
        info = json.loads(info_path.read_text())
        self.cache_shape, self.one_tokenizer = tuple(info["cache_shape"]), info.get("one_tokenizer", True)

    def blob_path(self, item: CommItem, method: KVMethod | KVCommMethod | QKVCommMethod, cap: int | None) -> Path:
        """The stable file name of one message."""
        return self.folder / _safe(item.item_id) / f"{_safe(method.name)}@{'full' if cap is None else cap}.kvw"

    def encode(self, item: CommItem, method: KVMethod | KVCommMethod | QKVCommMethod, cap: int | None,
               receiver_head: int) -> Sent:
        path = self.blob_path(item, method, cap)
        sidecar = path.with_suffix(".json")
        if sidecar.exists():
            return self._load(path, sidecar)
        if self.source is None:
            raise CommError(f"{path}: expected a stored message, found none (and no sharer to compute it)")
        sent = self.source.encode(item, method, cap, receiver_head)
        meta = {"nbytes": sent.encoded.nbytes, "groups": "".join(GROUP_CODES[g] for g in sent.encoded.groups),
                "breakdown": sent.encoded.breakdown, "select_ms": sent.encoded.select_ms,
                "encode_ms": sent.encoded.encode_ms, "sharer_ms": sent.sharer_ms, "sharer_head": sent.sharer_head,
                "context_tokens": sent.context_tokens, "layer_bytes": sent.encoded.layer_bytes,
                "extra": sent.encoded.extra, "sha256": hashlib.sha256(sent.encoded.blob or b"").hexdigest()}
        if sent.encoded.blob is not None:
            atomic_write(path, sent.encoded.blob)
        atomic_write(sidecar, json.dumps(meta) + "\n")  # last: a sidecar means the message is complete
        return sent

    def _load(self, path: Path, sidecar: Path) -> Sent:
        meta = json.loads(sidecar.read_text())
        blob = path.read_bytes() if meta["nbytes"] else None
        found = hashlib.sha256(blob or b"").hexdigest()
        if found != meta["sha256"] or len(blob or b"") != meta["nbytes"]:
            raise CommError(f"{path}: expected the blob its sidecar describes ({meta['nbytes']} bytes, sha256 "
                            f"{meta['sha256'][:12]}), found {len(blob or b'')} bytes, sha256 {found[:12]}")
        groups = [GROUP_NAMES[c] for c in meta["groups"]]
        encoded = Encoded(blob, meta["nbytes"], groups, meta["breakdown"], meta["select_ms"], meta["encode_ms"],
                          meta["layer_bytes"], meta["extra"])
        return Sent(encoded, meta["sharer_ms"], meta["sharer_head"], meta["context_tokens"])

    def hints(self, items: list[CommItem]) -> dict[str, tuple[str, float]]:
        path = self.folder / "hints.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        missing = [item for item in items if item.item_id not in stored]
        if missing:
            if self.source is None:
                raise CommError(f"{path}: expected hints for {len(missing)} more item(s) (e.g. "
                                f"{missing[0].item_id}), found none and no sharer to write them")
            stored.update({k: list(v) for k, v in self.source.hints(missing).items()})
            atomic_write(path, json.dumps(stored, indent=1) + "\n")
        return {item.item_id: tuple(stored[item.item_id]) for item in items}

    def release(self) -> None:
        if self.source is not None:
            self.source.release()
