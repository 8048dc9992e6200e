"""Benchmark: the engine with a model's layers split over two devices (`PipelineModel`), swept over the split
point and the number of micro-batches, against the whole model on the first device, in the same run.

Each case generates the same sampled rollout batch (random prompts, n candidates, fixed lengths) and reports
tokens/s (median of repeats), prefill and decode seconds, and whether its tokens equal the single-device
run's. On two GPUs the micro-batches let the second stage of one part run while the first computes the next.

  python -m ember.cli bench pipeline --model qwen3-4b --dtype bfloat16 --devices cuda:0,cuda:1 \\
      --splits 9,18,27 --micro-batches 1,2,4 --out reports/bench/pipeline_h200x2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ember.bench.generate import median_of_runs, time_ember
from ember.engine import Engine, SamplingParams
from ember.engine.pipeline import PipelineModel
from ember.errors import GenerationError
from ember.experiments.workloads import random_prompts
from ember.models import load
from ember.report import atomic_write, run_manifest


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise GenerationError(f"expected comma-separated integers, found {text!r}") from None


def _greedy_tokens(engine, prompts, n: int, gen: int) -> list[list[int]]:
    result = engine.generate(prompts, n=n, sampling=SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True))
    return [c.token_ids for out in result.outputs for c in out.completions]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ember bench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b", help="preset, package model or directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--devices", default="cuda:0,cuda:1", help="the two stages' devices (cpu,cpu for a check)")
    parser.add_argument("--splits", default="", help="split layers, comma-separated (default: a quarter, a half)")
    parser.add_argument("--micro-batches", default="1,2", help="micro-batch counts, comma-separated")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--context", type=int, default=256, help="prompt tokens")
    parser.add_argument("--gen", type=int, default=64, help="new tokens per candidate")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="reports/bench/pipeline.json")
    args = parser.parse_args(argv)
    devices = [d.strip() for d in args.devices.split(",")]
    if len(devices) != 2:
        raise GenerationError(f"--devices: expected two devices, found {args.devices!r}")
    cuda = [torch.device(d) for d in devices if torch.device(d).type == "cuda"]
    if cuda and torch.cuda.device_count() <= max(d.index or 0 for d in cuda):
        raise GenerationError(f"--devices: {args.devices} needs {max(d.index or 0 for d in cuda) + 1} GPUs, found "
                              f"{torch.cuda.device_count()}")
    whole = load(args.model, dtype=args.dtype, device=devices[0], seed=0)
    layers = whole.config.num_layers
    splits = _int_list(args.splits) or sorted({max(1, layers // 4), layers // 2})
    prompts = random_prompts(whole.config.vocab_size, args.prompts, args.context, 0)
    batch = args.prompts * args.candidates
    report = run_manifest("bench-pipeline", vars(args), whole.provenance, devices[0], extra={"cases": []})
    engine = Engine(whole.model, whole.tokenizer, max_batch_size=batch, progress=False, prefix_cache=False)
    time_ember(engine, prompts, args.candidates, args.gen)  # warm-up
    single = median_of_runs([time_ember(engine, prompts, args.candidates, args.gen) for _ in range(args.repeats)])
    reference = _greedy_tokens(engine, prompts, args.candidates, args.gen)
    report["single_device"] = single
    print(json.dumps({"single_device": single}), flush=True)
    del engine, whole
    for split in splits:
        for micro in _int_list(args.micro_batches):
            loaded = load(args.model, dtype=args.dtype, device="cpu", seed=0)  # the same weights, moved by stage
            piped = PipelineModel(loaded.model, split, devices, micro_batches=micro)
            engine = Engine(piped, loaded.tokenizer, max_batch_size=batch, progress=False, prefix_cache=False)
            time_ember(engine, prompts, args.candidates, args.gen)
            case = {"split": split, "micro_batches": micro, **median_of_runs(
                [time_ember(engine, prompts, args.candidates, args.gen) for _ in range(args.repeats)])}
            case["same_greedy_tokens"] = _greedy_tokens(engine, prompts, args.candidates, args.gen) == reference
            case["tokens_per_s_vs_single"] = case["tokens_per_s"] / single["tokens_per_s"]
            report["cases"].append(case)
            print(json.dumps(case), flush=True)
            del engine, piped, loaded
    atomic_write(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
