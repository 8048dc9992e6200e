"""fig6: prefix-cache savings vs shared-prefix length. Prefill time of D documents that share a prefix,
with the prefix cache on and off, against the bound set by the prefix's share of prefill FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from ember.engine import Engine, SamplingParams
from ember.engine.prefix_cache import PrefixCache
from ember.experiments.workloads import resolve_device, shared_prefix_documents
from ember.models.flops import prefill_flops
from ember.params import RunParams, param
from ember.report import macro_name


@dataclass(frozen=True)
class Params(RunParams):
    """Grid (prompt length x shared-prefix length) and workload of fig6."""

    prompt_lens: tuple[int, ...] = param((64, 128), low=1)
    prefix_lens: tuple[int, ...] = param((0, 32, 64, 96), low=0)
    documents: int = param(6, low=1)
    batch_size: int = param(3, low=1)
    block_size: int = param(16, low=1)
    cache_mb: int = param(1024, low=1)


def cells(params: Params) -> list[tuple[int, int]]:
    """(prompt_len, prefix_len) pairs; a prefix as long as the prompt is clipped to leave one token."""
    pairs = []
    for prompt in params.prompt_lens:
        for prefix in params.prefix_lens:
            pair = (prompt, min(prefix, prompt - 1))
            if pair not in pairs:
                pairs.append(pair)
    return pairs


def flop_bounds(config, prompt: int, prefix: int, documents: int, block: int) -> dict:
    """Savings bounds: the prefix's share of one document's prefill FLOPs, and the amortized bound for D
    documents when the block-aligned prefix is computed once."""
    full = prefill_flops(config, prompt)
    reusable = prefix // block * block
    suffix = prefill_flops(config, prompt - prefix, prefix)
    amortized = prefill_flops(config, reusable) + documents * prefill_flops(config, prompt - reusable, reusable)
    return {"prefix_flop_fraction": 1 - suffix / full, "amortized_bound": 1 - amortized / (documents * full)}


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Measure prefill seconds per cell with the cache off and on (a fresh cache each repeat)."""
    device = resolve_device(params.device)
    engine = Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed,
                         max_batch_size=params.batch_size, progress=False)
    config = engine.model.config
    sampling = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    rows = []
    for prompt, prefix in tqdm(cells(params), desc=params.target, disable=None if progress is None else not progress):
        docs = shared_prefix_documents(config.vocab_size, params.documents, prompt, prefix, params.seed + prompt)
        for _ in range(params.warmup):
            engine.generate(docs[: params.batch_size], sampling=sampling, use_prefix_cache=False)
        for repeat in range(params.repeats):
            off = engine.generate(docs, sampling=sampling, use_prefix_cache=False)
            engine.prefix_cache = PrefixCache(params.block_size, params.cache_mb << 20)
            on = engine.generate(docs, sampling=sampling)
            stats = on.extra["prefix_cache"]
            row = {"prompt_len": prompt, "prefix_len": prefix, "documents": params.documents, "repeat": repeat,
                   "prefill_off_s": off.timings["prefill"], "prefill_on_s": on.timings["prefill"],
                   "tokens_reused": stats["tokens_reused"], "tokens_recomputed": stats["tokens_recomputed"],
                   "hits": stats["hits"], "misses": stats["misses"], "evictions": stats["evictions"],
                   "cache_bytes": stats["bytes_held"]}
            row.update(flop_bounds(config, prompt, prefix, params.documents, params.block_size))
            rows.append(row)
    df = pd.DataFrame(rows)
    df["savings"] = 1 - df["prefill_on_s"] / df["prefill_off_s"]
    df["speedup"] = df["prefill_off_s"] / df["prefill_on_s"]
    df["prefix_fraction"] = df["prefix_len"] / df["prompt_len"]
    return df, engine.provenance


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean per cell; savings and bounds in %."""
    cols = ["prefill_off_s", "prefill_on_s", "savings", "speedup", "prefix_flop_fraction", "amortized_bound",
            "tokens_reused", "tokens_recomputed", "evictions", "prefix_fraction"]
    summary = df.groupby(["prompt_len", "prefix_len"], as_index=False)[cols].mean()
    for col in ("savings", "prefix_flop_fraction", "amortized_bound"):
        summary[col] *= 100
    summary["savings_vs_bound"] = summary["savings"] / summary["amortized_bound"].where(summary["amortized_bound"] > 0)
    return summary


def macros(summary: pd.DataFrame, target: str = "fig6") -> dict[str, float]:
    """Savings (%), speedup and FLOP bound (%) per cell."""
    values = {}
    for row in summary.itertuples():
        cell = ("prompt", row.prompt_len, "prefix", row.prefix_len)
        values[macro_name(target, "savings", *cell)] = row.savings
        values[macro_name(target, "speedup", *cell)] = row.speedup
        values[macro_name(target, "bound", *cell)] = row.amortized_bound
    return values
