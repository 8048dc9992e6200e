"""Streaming generation: the per-token events `Engine.stream` yields, and two ways to print them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import IO, Iterable


@dataclass(frozen=True)
class StreamEvent:
    """One generated token of one candidate. A candidate's `text` deltas join to its Completion.text: text is
    held back while a character is incomplete or while it may still begin a stop string."""

    request: int  # index of the prompt
    candidate: int  # index of the candidate within its prompt, 0..n-1
    token_id: int
    text: str
    logprob: float
    finish_reason: str | None  # "stop" or "length" on the candidate's last token, else None


def write_jsonl(events: Iterable[StreamEvent], out: IO[str]) -> None:
    """One JSON object per event, flushed as it comes."""
    for event in events:
        out.write(json.dumps(dataclasses.asdict(event), ensure_ascii=False) + "\n")
        out.flush()


def write_text(events: Iterable[StreamEvent], out: IO[str], labels: bool = True) -> None:
    """The candidates' text one after another, each ended by a newline; with `labels`, inside a
    `[request r, candidate c]` line and a `[finish reason]` line. The candidate being printed appears as it is
    produced; later ones (decoding in the same batch) are buffered until their turn."""
    pending: dict[tuple[int, int], list[str]] = {}
    finished: dict[tuple[int, int], str] = {}
    order: list[tuple[int, int]] = []  # candidates in the order they first appeared
    shown = 0  # candidates of `order` printed completely

    def begin(key):
        if labels:
            out.write(f"[request {key[0]}, candidate {key[1]}]\n")

    for event in events:
        key = (event.request, event.candidate)
        if key not in pending:
            pending[key] = []
            order.append(key)
            if len(order) == shown + 1:
                begin(key)
        pending[key].append(event.text)
        if event.finish_reason is not None:
            finished[key] = event.finish_reason
        while shown < len(order):
            current = order[shown]
            out.write("".join(pending[current]))
            pending[current].clear()
            if current not in finished:
                break
            out.write(f"\n[{finished[current]}]\n" if labels else "\n")
            shown += 1
            if shown < len(order):
                begin(order[shown])
        out.flush()
