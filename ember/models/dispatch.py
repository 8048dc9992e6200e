"""The dispatch report: with EMBER_DEBUG_DISPATCH=1 every forward pass logs, per layer, which attention path
(the SDPA backend torch picks for these inputs and the kind of mask) and which LoRA path (fused kernel or the
two-GEMM reference) ran, so a silent fallback to a slow path is visible. Logged on the "ember.dispatch" logger
(to stderr when nothing else handles it); `last()` returns the latest report. Off by default: the only cost
then is a None check per layer and per adapted projection.

Inside a captured CUDA graph the report is the one of the captured step (replays run no Python).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from contextlib import contextmanager

import torch

ENV = "EMBER_DEBUG_DISPATCH"
log = logging.getLogger("ember.dispatch")
_current: DispatchReport | None = None
_last: DispatchReport | None = None


def enabled() -> bool:
    """Whether EMBER_DEBUG_DISPATCH asks for reports (any value but '' and '0')."""
    return os.environ.get(ENV, "0") not in ("", "0")


class DispatchReport:
    """What ran in each layer of one forward pass: {layer: {"attention": [...], "lora": [...]}}."""

    def __init__(self, layers: tuple[int, int]):
        self.range = layers
        self.layer = layers[0]
        self.paths: dict[int, dict[str, list[str]]] = {}

    def note(self, what: str, path: str) -> None:
        self.paths.setdefault(self.layer, {}).setdefault(what, []).append(path)

    def summary(self) -> str:
        """One line per run of consecutive layers that took the same paths."""
        lines, start, previous = [], None, None
        layers = list(range(*self.range))
        for layer in layers + [None]:
            entry = None if layer is None else _entry(self.paths.get(layer, {}))
            if entry != previous:
                if previous is not None:
                    lines.append(f"layers {start}-{last}: {previous}")
                start, previous = layer, entry
            last = layer
        return "dispatch: " + "; ".join(lines)


def _entry(paths: dict[str, list[str]]) -> str:
    parts = []
    for what in ("attention", "lora"):
        counts = Counter(paths.get(what, []))
        if counts:
            parts.append(f"{what}=" + ",".join(f"{p} x{n}" if n > 1 else p for p, n in counts.items()))
    return " ".join(parts) or "no attention or LoRA"


@contextmanager
def recording(layers: tuple[int, int]):
    """Collect the report of one forward pass over `layers` [a, b) and log it (nested passes join the outer)."""
    global _current, _last
    if _current is not None:
        yield _current
        return
    report = _current = DispatchReport(layers)
    try:
        yield report
    finally:
        _current, _last = None, report
        if not log.handlers and not logging.getLogger().handlers:
            log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
        log.info(report.summary())


def recording_now() -> bool:
    """Whether a report is being collected."""
    return _current is not None


def at_layer(layer: int) -> None:
    if _current is not None:
        _current.layer = layer


def note(what: str, path: str) -> None:
    """Record a path taken in the current layer (no-op unless a report is being collected)."""
    if _current is not None:
        _current.note(what, path)


def last() -> DispatchReport | None:
    """The latest finished report (None before the first)."""
    return _last


def attention_path(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, causal: bool,
                   layer_masked: bool) -> str:
    """'sdpa:<backend> mask=<kind>': the SDPA backend torch picks for these inputs and the mask's kind (none,
    causal, a bias object such as lower-right causal, a bool tensor, a bool tensor with a per-layer mask);
    torch's choice is read with its internal `_fused_sdp_choice`, 'unknown' where that is missing."""
    if mask is None:
        kind = "causal" if causal else "none"
    elif isinstance(mask, torch.Tensor):
        kind = "bool+layer" if layer_masked else "bool"
    else:
        kind = type(mask).__name__
    if mask is not None and not isinstance(mask, torch.Tensor):
        return f"sdpa:bias mask={kind}"  # a bias object picks its own kernels
    try:
        choice = torch._fused_sdp_choice(q, keys, values, mask, 0.0, causal, enable_gqa=True)
        backend = torch.nn.attention.SDPBackend(choice).name.lower()
    except (AttributeError, RuntimeError, TypeError, ValueError):  # a torch without the query: say so
        backend = "unknown"
    return f"sdpa:{backend} mask={kind}"
