"""Benchmark: a rollout batch with a long tail of lengths, decoded with and without continuous batching.

Each request's max_tokens is drawn from a heavy-tailed (Pareto) distribution, seeded, and EOS is allowed, so a
static batch decodes every row until its longest row ends while continuous batching (`Engine(...,
continuous_batching=True)`) admits waiting requests into the rows of finished prompt groups. Reports tokens/s
(median of repeats), the rows decoded per generated token, and whether both give the same tokens. Writes JSON.

  python -m ember.cli bench long_tail --model smollm2-135m-instruct --prompts 32 --candidates 4 \\
      --max-batch-size 32 --longest 128 --out reports/bench/long_tail_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

from ember.engine import Engine, SamplingParams
from ember.errors import GenerationError
from ember.experiments.workloads import resolve_device
from ember.models import load
from ember.report import atomic_write, run_manifest

TOPICS = ("rivers", "bread", "chess", "volcanoes", "bicycles", "owls", "glass", "tides", "maps", "violins")


def tail_lengths(count: int, shortest: int, longest: int, alpha: float, seed: int) -> list[int]:
    """`count` max_tokens values from a Pareto(alpha) tail starting at `shortest`, capped at `longest`."""
    rng = random.Random(seed)
    return [min(longest, int(shortest * rng.paretovariate(alpha))) for _ in range(count)]


def _prompts(count: int) -> list[str]:
    return [f"Write about {TOPICS[i % len(TOPICS)]} (note {i})." for i in range(count)]


def time_mode(loaded, continuous: bool, prompts, n: int, sampling, max_batch: int, repeats: int) -> tuple[dict, list]:
    """tokens/s (median of `repeats`) and rows decoded per generated token, with the generated tokens."""
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=max_batch, progress=False, prefix_cache=False,
                    continuous_batching=continuous)
    rows = {"decoded": 0}
    run = loaded.model.run

    def counting(step, **kwargs):  # rows of each one-token decode step
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] == 1:
            rows["decoded"] += ids.shape[0]
        return run(step, **kwargs)

    loaded.model.run = counting
    try:
        results = [engine.generate(prompts, n=n, sampling=sampling) for _ in range(repeats)]
    finally:
        del loaded.model.run  # back to the class's method
    tokens = [[c.token_ids for out in r.outputs for c in out.completions] for r in results]
    generated = results[0].generated_tokens
    case = {"continuous": continuous, "generated_tokens": generated, "batches": results[0].batches,
            "total_s": statistics.median(r.timings["total"] for r in results),
            "rows_decoded_per_token": rows["decoded"] / repeats / generated}
    case["tokens_per_s"] = generated / case["total_s"]
    return case, tokens[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ember bench long_tail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="preset, package model or directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=32, help="rows decoded at once (prompts x candidates)")
    parser.add_argument("--shortest", type=int, default=8, help="the Pareto tail's smallest max_tokens")
    parser.add_argument("--longest", type=int, default=128, help="cap on max_tokens")
    parser.add_argument("--alpha", type=float, default=1.2, help="Pareto shape (smaller: heavier tail)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="reports/bench/long_tail.json")
    args = parser.parse_args(argv)
    if args.prompts * args.candidates <= args.max_batch_size:
        raise GenerationError(f"--prompts x --candidates: expected more rows than --max-batch-size "
                              f"({args.max_batch_size}) so that requests wait, found {args.prompts * args.candidates}")
    device = resolve_device(args.device)
    loaded = load(args.model, dtype=args.dtype, device=device, seed=args.seed)
    lengths = tail_lengths(args.prompts, args.shortest, args.longest, args.alpha, args.seed)
    sampling = [SamplingParams(temperature=1.0, max_tokens=length, seed=args.seed + i)
                for i, length in enumerate(lengths)]
    prompts = _prompts(args.prompts)
    report = run_manifest("bench-long-tail", vars(args), loaded.provenance, device, extra={"max_tokens": lengths})
    static, static_tokens = time_mode(loaded, False, prompts, args.candidates, sampling, args.max_batch_size,
                                      args.repeats)
    continuous, continuous_tokens = time_mode(loaded, True, prompts, args.candidates, sampling,
                                              args.max_batch_size, args.repeats)
    report.update(static=static, continuous=continuous, same_tokens=static_tokens == continuous_tokens,
                  continuous_tokens_per_s_vs_static=continuous["tokens_per_s"] / static["tokens_per_s"])
    print(json.dumps({k: report[k] for k in ("static", "continuous", "same_tokens")}), flush=True)
    atomic_write(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
