"""Benchmark: the rollout KV cache with each prompt's K/V copied into every candidate row (`KVCache`) against
stored once per prompt (`SharedPromptCache`, `Engine(share_prompt_kv=True)`).

Memory: the bytes of the two caches a batch of P prompts x n candidates allocates, at a preset's shape, read off
the cache objects themselves built on the meta device (nothing is allocated). Speed (with --model): the same
generation through both engines on random prompts, tokens/s (median of repeats), whether the tokens are the
same, and on a GPU the peak memory of each. Writes JSON.

  python -m ember.cli bench prompt_kv --shape qwen3-4b --prompt 4096 --gen 256 --candidates 64 \
      --model qwen2.5-0.5b --time-prompt 512 --time-candidates 8 --out reports/bench/prompt_kv.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ember.bench.generate import median_of_runs, time_ember
from ember.engine import Engine, KVCache, SamplingParams
from ember.engine.shared_cache import SharedPromptCache
from ember.errors import GenerationError
from ember.experiments.workloads import random_prompts, resolve_device
from ember.models import load
from ember.models.presets import PRESETS, preset_config
from ember.report import atomic_write, run_manifest


def cache_bytes(shape: str, dtype: torch.dtype, prompts: int, candidates: int, prompt: int, gen: int) -> dict:
    """Bytes of the dense and the shared cache of one batch at a preset's shape (meta tensors: no memory)."""
    config = preset_config(shape)
    batch = prompts * candidates
    dense = KVCache(config, batch, prompt + gen, dtype, "meta")
    shared = SharedPromptCache(config, batch, candidates, prompt, prompt + gen, dtype, "meta")
    return {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "prompts": prompts,
            "candidates": candidates, "prompt_tokens": prompt, "gen_tokens": gen,
            "dense_bytes": dense.nbytes, "shared_bytes": shared.nbytes,
            "saved_bytes": dense.nbytes - shared.nbytes, "dense_over_shared": dense.nbytes / shared.nbytes}


def time_both(model: str, dtype: str, device: str, prompt: int, gen: int, candidates: int, prompts: int,
              repeats: int, seed: int = 0) -> dict:
    """The same sampled generation through a dense-cache and a shared-prompt engine: tokens/s, peak memory
    (GPU) and whether every candidate's tokens agree."""
    device = resolve_device(device)
    cuda = torch.device(device).type == "cuda"
    loaded = load(model, dtype=dtype, device=device, seed=seed)
    batch = random_prompts(loaded.config.vocab_size, prompts, prompt, seed)
    case = {"model": model, "prompts": prompts, "candidates": candidates, "prompt_tokens": prompt, "gen_tokens": gen}
    tokens = {}
    for name, share in (("dense", False), ("shared", True)):
        engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=prompts * candidates, progress=False,
                        prefix_cache=False, share_prompt_kv=share)
        time_ember(engine, batch, candidates, gen)  # warm-up
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        case[name] = median_of_runs([time_ember(engine, batch, candidates, gen) for _ in range(repeats)])
        case[name]["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
        greedy = SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True)
        result = engine.generate(batch, n=candidates, sampling=greedy)
        tokens[name] = [c.token_ids for out in result.outputs for c in out.completions]
    case["same_greedy_tokens"] = tokens["dense"] == tokens["shared"]
    case["shared_tokens_per_s_vs_dense"] = case["shared"]["tokens_per_s"] / case["dense"]["tokens_per_s"]
    return case


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ember bench prompt_kv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-4b", help=f"preset whose shape the memory is sized at: "
                                                            f"{', '.join(PRESETS)}")
    parser.add_argument("--dtype", default="bfloat16", help="cache dtype of the sizing")
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens (sizing)")
    parser.add_argument("--gen", type=int, default=256, help="generated tokens per candidate (sizing)")
    parser.add_argument("--candidates", type=int, default=64, help="candidates per prompt (sizing)")
    parser.add_argument("--prompts", type=int, default=1, help="prompts in the batch (sizing)")
    parser.add_argument("--model", default="", help="also time both engines on this model (preset, package "
                                                    "model, directory); empty: sizes only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--time-dtype", default="float32", help="dtype of the timed run")
    parser.add_argument("--time-prompt", type=int, default=512)
    parser.add_argument("--time-gen", type=int, default=16)
    parser.add_argument("--time-candidates", type=int, default=8)
    parser.add_argument("--time-prompts", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="reports/bench/prompt_kv.json")
    args = parser.parse_args(argv)
    if args.shape not in PRESETS:
        raise GenerationError(f"--shape: expected one of {sorted(PRESETS)}, found {args.shape!r}")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise GenerationError(f"--dtype: expected a torch dtype name (float32, bfloat16, ...), found {args.dtype!r}")
    sizes = cache_bytes(args.shape, dtype, args.prompts, args.candidates, args.prompt, args.gen)
    print(json.dumps(sizes), flush=True)
    device = resolve_device(args.device)
    report = run_manifest("bench-prompt-kv", vars(args), {}, device, extra={"memory": sizes})
    if args.model:
        report["timed"] = time_both(args.model, args.time_dtype, device, args.time_prompt, args.time_gen,
                                    args.time_candidates, args.time_prompts, args.repeats)
        print(json.dumps(report["timed"]), flush=True)
    atomic_write(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
