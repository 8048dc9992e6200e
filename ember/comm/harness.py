"""The equal-byte harness: every method answers the same items with the same prompts and greedy decoding,
at the same per-sample byte caps, and each row logs the cap, the bytes actually sent and the times.

Methods (spelled as in params): `alone` (the receiver without the context), `context` (the receiver reading
the context itself: the ceiling), `text:raw` (the context cut to the cap), `text:hint` (the sharer's
one-sentence hint cut to the cap), and `kv:<selection>:<precision>` / `rd:<selection>:<p1>+<p2>` (K/V
selected, or allocated over several precisions, under the cap), and the layer-wise baselines
`kvcomm:<precision>` / `qkvcomm:<selection>` (ember.comm.layer_baselines). Cap-free methods run once per item.
Across models whose caches differ in shape, K/V goes through a trained projector (ember.comm.projector) on
the receiver's side: the wire carries the sharer's K/V, the bytes are the sharer's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ember.comm.items import CommItem
from ember.comm.layer_baselines import LAYER_METHODS, KVCommMethod, QKVCommMethod
from ember.comm.prompt import PromptParts, prompt_parts
from ember.comm.text import truncate_utf8
from ember.comm.messages import SharerSide, cache_shape
from ember.comm.transfer import KVMethod, receive
from ember.engine import SamplingParams
from ember.errors import CommError

CAP_FREE = ("alone", "context")
LAYER_TYPES = (KVCommMethod, QKVCommMethod)
TEXT_METHODS = ("text:raw", "text:hint")


def parse_method(spec: str) -> str | KVMethod | KVCommMethod | QKVCommMethod:
    """A method name from params: one of CAP_FREE or TEXT_METHODS, a KVMethod for kv:/rd: specs, or a
    layer-wise baseline for kvcomm:<precision> / qkvcomm:<selection> (ember.comm.layer_baselines)."""
    if spec in CAP_FREE or spec in TEXT_METHODS:
        return spec
    kind, _, rest = spec.partition(":")
    if kind in LAYER_METHODS:
        if not rest or ":" in rest:
            raise CommError(f"method {spec!r}: expected '{kind}:<{'precision' if kind == 'kvcomm' else 'selection'}>'")
        return LAYER_METHODS[kind](rest)
    selection, _, precisions = rest.partition(":")
    if kind not in ("kv", "rd") or not selection or not precisions:
        raise CommError(f"method: expected one of {CAP_FREE + TEXT_METHODS}, 'kv:<selection>:<precision>', "
                        f"'rd:<selection>:<p1>+<p2>', 'kvcomm:<precision>' or 'qkvcomm:<selection>', found {spec!r}")
    method = KVMethod(selection, tuple(precisions.split("+")))
    if (kind == "kv") != (len(method.precisions) == 1):
        raise CommError(f"method {spec!r}: 'kv' takes one precision and 'rd' several")
    return method


def method_grid(methods: list[str], caps: list, cap_free: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """(method, cap) of every cell: each cap-free method once (cap None), then every other method at each cap."""
    return ([(m, None) for m in methods if m in cap_free]
            + [(m, cap) for m in methods if m not in cap_free for cap in caps])


@dataclass
class Sample:
    """One item prepared for the harness: its prompt spans (receiver tokens) and (lazily) the sharer's hint."""

    item: CommItem
    parts: PromptParts
    hint: str | None = None
    hint_ms: float = 0.0


class Harness:
    """Runs methods at caps over items for one (receiver, sharer) pair (with a projector when their caches
    differ in shape). The sharer's messages come from `messages` (ember.comm.messages: a StoredMessages folder
    in a sequential run, where `sharer` may be None), by default computed live with the sharer engine
    (`calibration`: the items that rank layers for kvcomm: methods)."""

    def __init__(self, receiver, sharer, items: list[CommItem], max_tokens: int = 16, hint_max_tokens: int = 64,
                 seed: int = 0, progress: bool | None = None, projector=None, messages=None,
                 calibration: list[CommItem] = ()):
        if receiver.tokenizer is None:
            raise CommError("harness: the receiver needs a tokenizer")
        self.receiver = receiver
        self.messages = messages if messages is not None else SharerSide(
            sharer, projector, seed, hint_max_tokens, calibration, receiver_tokenizer=receiver.tokenizer)
        self.max_tokens, self.seed = max_tokens, seed
        self.progress = progress
        self.projector = projector
        self.samples = [Sample(item, prompt_parts(receiver.tokenizer, item.context, item.question)) for item in items]
        self._head_kv = {}

    # ---- what the sharer sends -----------------------------------------------------------------------
    def _check_kv_pair(self, layer_wise: bool = False) -> None:
        mine, theirs = cache_shape(self.receiver), tuple(self.messages.cache_shape)
        if layer_wise and (mine != theirs or self.projector is not None):
            raise CommError(f"kvcomm:/qkvcomm: methods are same-model context transfers with no projector: expected "
                            f"a sharer cache shape equal to the receiver's {mine}, found {theirs}"
                            f"{' and a projector' if self.projector is not None else ''}")
        if self.projector is not None:
            made = (tuple(self.projector.receiver_shape), tuple(self.projector.sharer_shape))
            if made != (mine, theirs):
                raise CommError(f"projector: made for (receiver, sharer) cache shapes {made}, found {(mine, theirs)}")
        elif mine != theirs:
            raise CommError("context transfer without a projector needs the sharer's cache shape (layers, KV heads, "
                            f"head dim) to match the receiver's: expected {mine}, found {theirs}")
        elif not self.messages.one_tokenizer:
            raise CommError("context transfer without a projector needs one tokenizer on both sides: the sharer's "
                            "tokenizer differs from the receiver's (its K/V is of other tokens); pass a projector")

    def _hints(self) -> None:
        todo = [s for s in self.samples if s.hint is None]
        if todo:
            hints = self.messages.hints([s.item for s in todo])
            for sample in todo:
                sample.hint, sample.hint_ms = hints[sample.item.item_id]

    def _receiver_head(self, head: list[int]) -> torch.Tensor:
        key = tuple(head)
        if key not in self._head_kv:
            config = self.receiver.model.config
            empty = torch.zeros(config.num_layers, 2, config.num_kv_heads, 0, config.head_dim,
                                dtype=self.receiver.dtype, device=self.receiver.device)
            self._head_kv[key] = self.receiver.prefill_kv(head, use_prefix_cache=False)[0] if head else empty
        return self._head_kv[key]

    # ---- one method at one cap over every item -------------------------------------------------------
    def run(self, methods: list[str], caps: list[int | None]) -> list[dict]:
        """Rows for every (method, cap, item); cap None is full transfer (no cap)."""
        parsed = [(spec, parse_method(spec)) for spec in methods]
        if any(not isinstance(m, str) for _, m in parsed):
            self._check_kv_pair(any(isinstance(m, LAYER_TYPES) for _, m in parsed))
        if any(m == "text:hint" for _, m in parsed):
            self._hints()
        methods = dict(parsed)
        rows = []
        for spec, cap in tqdm(method_grid(list(methods), caps, CAP_FREE), desc="methods x caps",
                              disable=None if self.progress is None else not self.progress):
            rows.extend(self._cell(spec, methods[spec], cap))
        return rows

    def _cell(self, spec: str, method, cap: int | None) -> list[dict]:
        prompts, pasts, rows = [], [], []
        for sample in self.samples:
            row = {"item_id": sample.item.item_id, "task": sample.item.task, "method": spec,
                   "family": spec.split(":")[0] if ":" in spec else spec, "cap": cap,
                   "context_tokens": len(sample.parts.context), "truncated": False, "tokens_sent": 0}
            prompt, past = self._prepare(sample, method, cap, row)
            prompts.append(prompt)
            pasts.append(past)
            rows.append(row)
        sampling = SamplingParams(temperature=0, max_tokens=self.max_tokens)
        use_past = any(p is not None for p in pasts)
        if use_past:
            pasts = [p if p is not None else self._no_past(s) for p, s in zip(pasts, self.samples)]
        began = time.perf_counter()
        result = self.receiver.generate(prompts, sampling=sampling, progress=False,
                                        use_prefix_cache=False, past=pasts if use_past else None)
        receiver_ms = 1e3 * (time.perf_counter() - began) / len(prompts)  # batch time, per sample
        for row, sample, out in zip(rows, self.samples, result.outputs):
            text = out.completions[0].text
            row.update(output=text, correct=bool(sample.item.score(text)), receiver_ms=receiver_ms)
            row["slack"] = None if cap is None else cap - row["bytes"]
            row["e2e_ms"] = sum(row.get(k, 0.0) for k in ("sharer_ms", "select_ms", "encode_ms", "decode_ms",
                                                            "project_ms", "receiver_ms"))
        return rows

    def _no_past(self, sample: Sample):
        """A past holding only the receiver's head (batched with samples that have one)."""
        return receive(None, self._receiver_head(sample.parts.head), 0, self.receiver.device, self.receiver.dtype)[0]

    def _prepare(self, sample: Sample, method, cap: int | None, row: dict):
        """The receiver's prompt tokens and past for one sample, filling the row's bytes and times."""
        parts = sample.parts
        if method == "alone":
            row["bytes"] = 0
            return parts.without_context, None
        if method == "context":
            row["bytes"] = len(sample.item.context.encode("utf-8"))
            return parts.full, None
        if method in TEXT_METHODS:
            raw = method == "text:raw"
            text = sample.item.context if raw else sample.hint
            sent, cut = (text, False) if cap is None else truncate_utf8(text, cap)
            row.update(bytes=len(sent.encode("utf-8")), truncated=cut, message=sent,
                       sharer_ms=0.0 if raw else sample.hint_ms)
            return parts.head + (self.receiver.tokenizer.encode(sent) if sent else []) + parts.tail, None
        sent = self.messages.encode(sample.item, method, cap, len(parts.head))
        if sent.context_tokens != len(parts.context):
            raise CommError(f"item {sample.item.item_id}: context transfer expects the context's K/V at the "
                            f"receiver's {len(parts.context)} tokens, found {sent.context_tokens} sharer tokens (a "
                            f"sharer side without the receiver's tokenizer?)")
        encoded = sent.encoded
        head_kv = self._receiver_head(parts.head)
        past, decode_ms, project_ms = receive(encoded.blob, head_kv, sent.context_tokens, self.receiver.device,
                                              self.receiver.dtype, self.projector, sent.sharer_head)
        row.update(bytes=encoded.nbytes, tokens_sent=encoded.tokens_sent, sharer_ms=sent.sharer_ms,
                   select_ms=encoded.select_ms, encode_ms=encoded.encode_ms, decode_ms=decode_ms,
                   project_ms=project_ms, layer_bytes=" ".join(map(str, encoded.layer_bytes)),
                   **{f"bytes_{k}": v for k, v in encoded.breakdown.items()},
                   **{f"tokens_{p}": encoded.groups.count(p) for p in method.precisions}, **encoded.extra)
        return parts.tail, past


def sharer_pass(messages, items: list[CommItem], receiver_tokenizer, methods: list[str],
                caps: list[int | None]) -> None:
    """Compute (and, with StoredMessages, save) every message the methods need at the caps, with no receiver
    loaded: the first half of a sequential run. `receiver_tokenizer` gives the receiver's template head (where
    proj_vnorm places projected tokens)."""
    parsed = [parse_method(spec) for spec in methods]
    if "text:hint" in parsed:
        messages.hints(items)
    for method in (m for m in parsed if not isinstance(m, str)):
        for cap in caps:
            for item in items:
                head = prompt_parts(receiver_tokenizer, item.context, item.question).head
                messages.encode(item, method, cap, len(head))
