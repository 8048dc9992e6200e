"""fig7: budget curves. Accuracy against the bytes actually on the wire, for K/V transfer (token selection,
precision, RD allocation; every payload a measured KVWire blob) and for text at the same per-sample byte cap
(the raw context, the sharer's one-sentence hint), next to the receiver alone and the receiver reading the
context itself. One (receiver, sharer) pair and one task per run; the pair is params: `sharer` empty is the
Identical pair (the receiver as its own sharer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from ember.comm.harness import CAP_FREE, TEXT_METHODS, Harness, parse_method
from ember.comm.items import COMM_TASKS, comm_items
from ember.engine import Engine
from ember.errors import ParamsError
from ember.experiments.workloads import resolve_device
from ember.params import RunParams, param
from ember.report import macro_name
from ember.tasks.metrics import wilson_interval

MODES = ("context_transfer",)


@dataclass(frozen=True)
class Params(RunParams):
    """The pair, the task and its items, the methods and the per-sample byte caps of fig7."""

    sharer: str = ""  # "" = the receiver itself (Identical pair)
    pair: str = "identical"  # the pair's name in plots and macros
    mode: str = param("context_transfer", choices=MODES)
    task: str = param("recall", choices=COMM_TASKS)
    items: int = param(4, low=1)
    facts: int = param(4, low=1, high=30)  # recall: facts in the context
    context_tokens: int = param(0, low=0)  # recall: distractors added up to this many context tokens
    caps: tuple[int, ...] = param((256, 4096), low=0)  # per-sample byte caps; full transfer is added by `full`
    full: bool = True
    methods: tuple[str, ...] = ("alone", "context", "text:raw", "kv:front:int8")
    max_tokens: int = param(8, low=1)
    hint_max_tokens: int = param(48, low=1)
    batch_size: int = param(16, low=1)

    def validate(self) -> None:
        super().validate()
        for spec in self.methods:
            try:
                parse_method(spec)
            except Exception as error:
                raise ParamsError(f"Params.methods: {error}") from None
        if not any(m not in CAP_FREE for m in self.methods) and self.caps:
            raise ParamsError("Params.methods: expected at least one capped method (text or kv) for the caps")


def load_pair(params: Params, device: str) -> tuple[Engine, Engine]:
    """The receiver engine and the sharer engine (the same object for the Identical pair)."""
    receiver = Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed,
                           max_batch_size=params.batch_size, prefix_cache=False, progress=False)
    if not params.sharer or params.sharer == params.model:
        return receiver, receiver
    sharer = Engine.load(params.sharer, dtype=params.dtype, device=device, seed=params.seed + 1,
                         max_batch_size=params.batch_size, prefix_cache=False, progress=False)
    return receiver, sharer


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Every method at every cap over the same seeded items: one row per (method, cap, item)."""
    device = resolve_device(params.device)
    receiver, sharer = load_pair(params, device)
    count = (lambda text: len(receiver.tokenizer.encode(text))) if params.context_tokens else None
    items = comm_items(params.task, params.items, params.seed, facts=params.facts,
                       context_tokens=params.context_tokens, count_tokens=count)
    harness = Harness(receiver, sharer, items, params.max_tokens, params.hint_max_tokens, params.seed, progress)
    caps = list(params.caps) + ([None] if params.full else [])
    df = pd.DataFrame(harness.run(list(params.methods), caps))
    df["pair"] = params.pair
    provenance = dict(receiver.provenance)
    if sharer is not receiver:
        provenance["sharer"] = sharer.provenance
    return df, provenance


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, cap): accuracy with its 95% Wilson interval, mean and max bytes sent, tokens sent,
    truncation rate and mean times. Cap NaN is full transfer (or a cap-free method)."""
    df = df.assign(cap=df["cap"].astype("float64"))
    rows = []
    for (method, cap), part in df.groupby(["method", "cap"], dropna=False, sort=False):
        correct, n = int(part["correct"].sum()), len(part)
        low, high = wilson_interval(correct, n)
        row = {"method": method, "family": part["family"].iloc[0], "cap": cap, "n": n, "accuracy": correct / n,
               "ci_low": low, "ci_high": high, "bytes_mean": part["bytes"].mean(), "bytes_max": part["bytes"].max(),
               "tokens_sent": part["tokens_sent"].mean(), "truncated_rate": part["truncated"].astype(float).mean()}
        for col in ("encode_ms", "decode_ms", "select_ms", "receiver_ms", "e2e_ms"):
            row[col] = part[col].mean() if col in part else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _is_cache(method: str) -> bool:
    return method.split(":")[0] in ("kv", "rd")


def compare(summary: pd.DataFrame) -> pd.DataFrame:
    """Per cap (full transfer last, as cap NaN): the best cache method and the best text baseline, their
    accuracies, and whether the cache beats text there."""
    capped = summary[summary["method"].map(lambda m: m not in CAP_FREE)]
    rows = []
    for cap, part in capped.groupby("cap", dropna=False, sort=True):
        cache, text = part[part["method"].map(_is_cache)], part[part["method"].isin(TEXT_METHODS)]
        if cache.empty or text.empty:
            continue
        best_cache, best_text = cache.loc[cache["accuracy"].idxmax()], text.loc[text["accuracy"].idxmax()]
        rows.append({"cap": cap, "cache_method": best_cache["method"], "cache_accuracy": best_cache["accuracy"],
                     "text_method": best_text["method"], "text_accuracy": best_text["accuracy"],
                     "cache_beats_text": bool(best_cache["accuracy"] > best_text["accuracy"])})
    return pd.DataFrame(rows)


def macros(summary: pd.DataFrame, params: Params) -> dict:
    """The smallest cap at which the best cache method beats the best text baseline ('none' if no cap), the
    accuracy gap (points) at full transfer, and the best accuracies of each side at every cap."""
    target, pair, task = params.target or "fig7", params.pair, params.task
    table = compare(summary)
    values = {}
    wins = table[table["cache_beats_text"] & table["cap"].notna()]
    values[macro_name(target, pair, task, "cache beats text cap")] = (
        str(int(wins["cap"].min())) if not wins.empty else "none")
    full = table[table["cap"].isna()]
    if not full.empty:
        gap = 100 * (full["cache_accuracy"].iloc[0] - full["text_accuracy"].iloc[0])
        values[macro_name(target, pair, task, "full gap")] = float(gap)
    for row in table.itertuples():
        cap = "full" if row.cap is None or math.isnan(row.cap) else int(row.cap)
        values[macro_name(target, pair, task, "cache", cap)] = 100 * float(row.cache_accuracy)
        values[macro_name(target, pair, task, "text", cap)] = 100 * float(row.text_accuracy)
    for method in CAP_FREE:
        part = summary[summary["method"] == method]
        if not part.empty:
            values[macro_name(target, pair, task, method)] = 100 * float(part["accuracy"].iloc[0])
    return values
