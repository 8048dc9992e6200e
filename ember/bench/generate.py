"""Benchmark: ember `Engine.generate` vs transformers `generate` on the same weights and workload.

Batch 1 and n candidates of one prompt; reports prefill time, total time and generated tokens/s (median of
repeats), plus the HBM roofline of a decode step on known GPUs. With --lora-rank r, also the same generation
with a LoRA adapter of rank r on all seven projections of every layer, and the latency of swapping two
resident adapters in place. Writes JSON.

  python -m ember.cli bench generate --model qwen2.5-0.5b --context 256 --gen 32 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ember.engine import Engine, SamplingParams
from ember.errors import GenerationError, ModelLoadError
from ember.experiments.workloads import random_prompts, resolve_device
from ember.models import LoraAdapter, load
from ember.report import atomic_write, run_manifest

# Peak HBM bandwidth in bytes/s by GPU name fragment (vendor data sheets).
HBM_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12}


def hf_twin(ember_model, device, dtype):
    """A transformers model holding exactly the ember model's weights (no disk round trip)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = ember_model.config.to_hf()
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    with torch.device(device):
        twin = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = twin.load_state_dict(ember_model.state_dict(), strict=False)
    tied_ok = set(missing) <= {"lm_head.weight"} and ember_model.config.tie_word_embeddings
    if unexpected or (missing and not tied_ok):
        raise ModelLoadError(f"HF twin weights: missing {missing}, unexpected {unexpected}")
    if ember_model.config.tie_word_embeddings:
        twin.lm_head.weight = twin.model.embed_tokens.weight
    return twin.eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_hf(model, prompts, n, gen, device, **options) -> dict:
    """Prefill time (a 1-token generate) and full generate time of transformers on equal-length prompts (each
    with n samples), sampling at temperature 1; `options` go to `generate` (e.g. a static cache)."""
    if len({len(prompt) for prompt in prompts}) != 1:
        raise GenerationError(f"time_hf: expected prompts of one length (no padding), found lengths "
                              f"{sorted({len(prompt) for prompt in prompts})}")
    ids = torch.tensor(prompts, device=device)  # (P, T)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                  attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None, **options)
    with torch.inference_mode():
        _sync(device)
        began = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        _sync(device)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        out = model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, **kwargs)
        _sync(device)
        total = time.perf_counter() - began
    generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {"prefill_s": prefill, "total_s": total, "generated_tokens": generated, "tokens_per_s": generated / total}


def time_ember(engine, prompts, n, gen) -> dict:
    """Prefill, decode, sampling and total seconds of one `generate` of n samples per prompt, at temperature 1."""
    sampling = SamplingParams(temperature=1.0, max_tokens=gen, ignore_eos=True, seed=0)
    result = engine.generate(prompts, n=n, sampling=sampling, progress=False)
    t = result.timings
    return {"prefill_s": t["prefill"], "decode_s": t["decode"], "sampling_s": t["sampling"], "total_s": t["total"],
            "generated_tokens": result.generated_tokens, "tokens_per_s": result.generated_tokens / t["total"]}


def median_of_runs(runs: list[dict]) -> dict:
    """The median of each field over repeated runs."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def roofline(loaded, device, context, gen, n) -> dict | None:
    """Lower bound on a decode step: (weights + KV read) / HBM bandwidth, for GPUs with a known bandwidth."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    bandwidth = next((bw for key, bw in HBM_BANDWIDTH.items() if key in name), None)
    if bandwidth is None:
        return None
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    elem = loaded.model.output_weight.element_size()
    cfg = loaded.config
    kv_bytes = n * (context + gen // 2) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
    step = (weight_bytes + kv_bytes) / bandwidth
    return {"gpu": name, "hbm_bytes_per_s": bandwidth, "weight_bytes": weight_bytes, "kv_bytes_mid_decode": kv_bytes,
            "weights_only_step_ms": 1e3 * weight_bytes / bandwidth, "step_ms": 1e3 * step,
            "tokens_per_s_bound": n / step}


def random_adapter(model, rank: int, seed: int) -> LoraAdapter:
    """A rank-`rank` adapter on every projection of every layer with non-zero B (random, small)."""
    adapter = LoraAdapter.create(model, r=rank, alpha=2 * rank, seed=seed, dtype=model.output_weight.dtype)
    generator = torch.Generator(device=model.output_weight.device).manual_seed(seed)
    with torch.no_grad():
        for _, b in adapter.weights.values():
            b.normal_(0, 0.01, generator=generator)
    return adapter


def swap_latency(engine, names: list[str], device, repeats: int = 20) -> dict:
    """Seconds from `set_adapter` to the copy having finished on the device, alternating two adapters."""
    times = []
    for i in range(repeats):
        _sync(device)
        began = time.perf_counter()
        engine.set_adapter(names[i % 2])
        _sync(device)
        times.append(time.perf_counter() - began)
    slots = engine._slots
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": repeats,
            "matrices": len(slots.buffers), "slot_bytes": slots.nbytes}


def run(model: str, dtype: str, device: str, context: int, gen: int, candidates: list[int], repeats: int,
        with_hf: bool, seed: int = 0, lora_rank: int = 0) -> dict:
    """Benchmark results as a JSON-ready dict."""
    device = resolve_device(device)
    loaded = load(model, dtype=dtype, device=device, seed=seed)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=max(candidates), progress=False,
                    prefix_cache=False)  # repeats of one prompt must not be served from the cache
    hf = hf_twin(loaded.model, device, loaded.model.output_weight.dtype) if with_hf else None
    prompt = random_prompts(loaded.config.vocab_size, 1, context, seed)[0]
    params = {"model": model, "dtype": dtype, "context": context, "gen": gen, "candidates": candidates,
              "repeats": repeats, "with_hf": with_hf, "seed": seed, "lora_rank": lora_rank}
    report = run_manifest("bench-generate", params, loaded.provenance, device, extra={"cases": []})
    names = [engine.load_adapter(random_adapter(loaded.model, lora_rank, s)) for s in (1, 2)] if lora_rank else []
    if names:
        engine.set_adapter(names[0])  # the first swap allocates nothing: slots exist since load_adapter
        report["lora_swap"] = swap_latency(engine, names, device)
        engine.set_adapter(None)
    if hf is not None:
        ids = torch.tensor([prompt[:64]], device=device)
        with torch.inference_mode():
            diff = (loaded.model(ids).float() - hf(input_ids=ids).logits.float()).abs().max().item()
        report["max_logit_diff_vs_transformers"] = diff
    for n in candidates:
        time_ember(engine, [prompt], n, gen)  # warm-up at the timed length (its CUDA graph)
        case = {"candidates": n, "ember": median_of_runs([time_ember(engine, [prompt], n, gen) for _ in range(repeats)]),
                "roofline": roofline(loaded, device, context, gen, n)}
        if names:  # the same generation with an adapter active
            engine.set_adapter(names[0])
            time_ember(engine, [prompt], n, gen)  # warm-up (captures the graph over the slots at the timed length)
            case["ember_lora"] = median_of_runs([time_ember(engine, [prompt], n, gen) for _ in range(repeats)])
            case["lora_tokens_per_s_vs_base"] = case["ember_lora"]["tokens_per_s"] / case["ember"]["tokens_per_s"]
            engine.set_adapter(None)
        if torch.device(device).type == "cuda":  # the same engine without CUDA graphs, to show what they buy
            eager = Engine(loaded.model, loaded.tokenizer, max_batch_size=max(candidates), progress=False,
                           cuda_graphs=False, prefix_cache=False)
            time_ember(eager, [prompt], n, gen)  # warm-up
            case["ember_eager"] = median_of_runs([time_ember(eager, [prompt], n, gen) for _ in range(repeats)])
        if hf is not None:
            time_hf(hf, [prompt], n, gen, device)  # warm-up
            case["transformers"] = median_of_runs([time_hf(hf, [prompt], n, gen, device) for _ in range(repeats)])
            case["speedup_tokens_per_s"] = case["ember"]["tokens_per_s"] / case["transformers"]["tokens_per_s"]
            case["speedup_prefill"] = case["transformers"]["prefill_s"] / case["ember"]["prefill_s"]
        report["cases"].append(case)
        print(json.dumps(case), flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ember bench generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b", help="model spec (preset, directory, hub id)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens")
    parser.add_argument("--gen", type=int, default=32, help="generated tokens per candidate")
    parser.add_argument("--candidates", default="1,8", help="comma-separated n values")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="also time generation with a LoRA adapter of this rank (all projections, all layers) "
                             "and adapter swaps; 0 skips it")
    parser.add_argument("--out", default="reports/bench/generate.json")
    args = parser.parse_args(argv)
    report = run(args.model, args.dtype, args.device, args.context, args.gen,
                 [int(x) for x in args.candidates.split(",")], args.repeats, not args.no_hf,
                 lora_rank=args.lora_rank)
    atomic_write(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
