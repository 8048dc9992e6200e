"""fig2: rollout time decomposition. Share of prefill, decode and sampling time per (context, gen) cell."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from ember.engine import Engine, SamplingParams
from ember.experiments.workloads import random_prompts, resolve_device
from ember.params import RunParams, param
from ember.report import macro_name

STAGES = ("prefill", "decode", "sampling", "other")


@dataclass(frozen=True)
class Params(RunParams):
    """Grid and workload of fig2. Every cell runs `prompts` prompts x `candidates` candidates."""

    context_lens: tuple[int, ...] = param((32, 64), low=1)
    gen_lens: tuple[int, ...] = param((8, 16), low=1)
    prompts: int = param(1, low=1)
    candidates: int = param(4, low=1)
    temperature: float = param(1.0, low=0.0)
    repeats: int = param(2, low=1)


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Time every grid cell `repeats` times; returns one row per (cell, repeat) and the weights' provenance."""
    device = resolve_device(params.device)
    engine = Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed,
                         max_batch_size=max(64, params.prompts * params.candidates), progress=False,
                         prefix_cache=False)  # measure raw rollouts: repeats must not reuse earlier prefills
    vocab = engine.model.config.vocab_size
    cells = [(c, g) for c in params.context_lens for g in params.gen_lens]
    rows = []
    for context, gen in tqdm(cells, desc=params.target, disable=None if progress is None else not progress):
        prompts = random_prompts(vocab, params.prompts, context, params.seed + context)
        sampling = SamplingParams(temperature=params.temperature, max_tokens=gen, ignore_eos=True, seed=params.seed)
        for _ in range(params.warmup):
            engine.generate(prompts, n=params.candidates, sampling=sampling)
        for repeat in range(params.repeats):
            result = engine.generate(prompts, n=params.candidates, sampling=sampling)
            t = result.timings
            rows.append({
                "context_len": context, "gen_len": gen, "prompts": params.prompts, "candidates": params.candidates,
                "repeat": repeat, "prefill_s": t["prefill"], "decode_s": t["decode"], "sampling_s": t["sampling"],
                "total_s": t["total"], "other_s": max(0.0, t["total"] - t["prefill"] - t["decode"] - t["sampling"]),
                "prompt_tokens": result.prompt_tokens, "generated_tokens": result.generated_tokens,
                "decode_tokens_per_s": result.decode_tokens_per_s,
            })
    df = pd.DataFrame(rows)
    for stage in STAGES:
        df[f"{stage}_share"] = df[f"{stage}_s"] / df["total_s"]
    return df, engine.provenance


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over repeats per cell: seconds, shares (in %) and decode throughput."""
    cols = [f"{s}_s" for s in STAGES] + ["total_s", "decode_tokens_per_s"] + [f"{s}_share" for s in STAGES]
    summary = df.groupby(["context_len", "gen_len"], as_index=False)[cols].mean()
    for stage in STAGES:
        summary[f"{stage}_share"] *= 100
    return summary


def macros(summary: pd.DataFrame, target: str = "fig2") -> dict[str, float]:
    """Prefill share (%) per cell, plus its range, as LaTeX macro values."""
    values = {}
    for row in summary.itertuples():
        values[macro_name(target, "prefill share ctx", row.context_len, "gen", row.gen_len)] = row.prefill_share
    values[macro_name(target, "prefill share max")] = summary["prefill_share"].max()
    values[macro_name(target, "prefill share min")] = summary["prefill_share"].min()
    return values

