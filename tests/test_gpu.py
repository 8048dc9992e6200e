"""CUDA paths: the same engine on GPU agrees with the CPU run (skipped without a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from ember.engine import Engine, SamplingParams
from ember.engine.shared_cache import SharedPromptCache
from ember.models import load
from ember.models.presets import preset_config

pytestmark = pytest.mark.gpu
PROMPTS = ["The code for Alice is 4821.", "Hi", "A longer prompt that needs left padding"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_cuda_fp32_matches_cpu(name):
    cpu, gpu = load(name), load(name)
    gpu.model.to("cuda")
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    a = Engine(cpu.model, cpu.tokenizer).generate(PROMPTS, n=2, sampling=params)
    b = Engine(gpu.model, gpu.tokenizer).generate(PROMPTS, n=2, sampling=params)
    for x, y in zip(a.outputs, b.outputs):
        assert x.completions[0].token_ids == y.completions[0].token_ids
        assert x.completions[0].logprobs == pytest.approx(y.completions[0].logprobs, abs=1e-3)


def test_sampler_draws_the_same_tokens_on_cuda():
    cpu, gpu = load("tiny-qwen3"), load("tiny-qwen3")
    gpu.model.to("cuda")
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=3, ignore_eos=True)
    a = Engine(cpu.model, cpu.tokenizer).generate(PROMPTS[:1], n=4, sampling=params)
    b = Engine(gpu.model, gpu.tokenizer).generate(PROMPTS[:1], n=4, sampling=params)
    assert [c.token_ids for c in a.outputs[0].completions] == [c.token_ids for c in b.outputs[0].completions]


def test_bf16_shape_preset_generates_with_cuda_timers():
    engine = Engine.load("qwen3-0.6b", dtype="bf16", device="cuda")
    prompt = torch.randint(0, 1000, (1, 128)).tolist()
    result = engine.generate(prompt, n=4, sampling=SamplingParams(max_tokens=16, ignore_eos=True, seed=0))
    assert result.generated_tokens == 64
    assert all(result.timings[s] > 0 for s in ("prefill", "decode", "sampling"))


def test_cuda_graph_decode_matches_eager():
    loaded = load("tiny-qwen2")
    loaded.model.to("cuda")
    params = SamplingParams(temperature=0.7, max_tokens=24, seed=9, ignore_eos=True)
    eager = Engine(loaded.model, loaded.tokenizer, cuda_graphs=False).generate(PROMPTS, n=3, sampling=params)
    graphed = Engine(loaded.model, loaded.tokenizer, cuda_graphs=True).generate(PROMPTS, n=3, sampling=params)
    for a, b in zip(eager.outputs, graphed.outputs):
        for x, y in zip(a.completions, b.completions):
            assert x.token_ids == y.token_ids
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_prefix_cache_reuse_on_cuda_matches_full_prefill():
    from ember.engine.prefix_cache import PrefixCache

    loaded = load("tiny-llama")
    loaded.model.to("cuda")
    shared = "Shared instructions for every document, long enough for blocks. "
    docs = [shared + f"Doc {i}: the code is {1000 + i}." for i in range(5)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    off = Engine(loaded.model, loaded.tokenizer, prefix_cache=False).generate(docs, sampling=greedy)
    engine = Engine(loaded.model, loaded.tokenizer, prefix_cache=PrefixCache(block_size=8))
    for _ in range(2):
        on = engine.generate(docs, sampling=greedy)
        for a, b in zip(off.outputs, on.outputs):
            assert a.completions[0].token_ids == b.completions[0].token_ids
            assert a.completions[0].logprobs == pytest.approx(b.completions[0].logprobs, abs=1e-4)
    assert on.extra["prefix_cache"]["tokens_reused"] > 0


def test_decode_graphs_are_captured_once_per_bucket_and_survive_adapter_swaps():
    from ember.models import LoraAdapter

    loaded = load("tiny-llama")
    loaded.model.to("cuda")
    params = SamplingParams(temperature=0.7, max_tokens=20, seed=4, ignore_eos=True)
    graphed = Engine(loaded.model, loaded.tokenizer, cuda_graphs=True, prefix_cache=False)
    eager = Engine(loaded.model, loaded.tokenizer, cuda_graphs=False, prefix_cache=False)
    first = graphed.generate(PROMPTS, n=2, sampling=params)
    second = graphed.generate(PROMPTS[::-1], n=2, sampling=params)  # same bucket: replayed, not recaptured
    assert first.timings["capture"] > 0 and second.timings.get("capture", 0) == 0 and len(graphed._graphs) == 1
    adapters = []
    for seed in (1, 2):
        adapter = LoraAdapter.create(loaded.model, r=4, alpha=8, seed=seed)
        for _, b in adapter.weights.values():
            b.data.normal_(0, 0.3)
        adapters.append(adapter)
    for engine in (graphed, eager):
        for i, adapter in enumerate(adapters):
            engine.load_adapter(adapter, f"a{i}")
    outputs = {}
    for name in ("a0", "a1", "a0", None):
        for label, engine in (("graphed", graphed), ("eager", eager)):
            engine.set_adapter(name)
            outputs[label] = engine.generate(PROMPTS, n=2, sampling=params)
        for a, b in zip(outputs["graphed"].outputs, outputs["eager"].outputs):
            for x, y in zip(a.completions, b.completions):
                assert x.token_ids == y.token_ids
                assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
    assert len(graphed._graphs) == 2  # the base graph and one over the adapter slots, whatever is swapped in
    assert [c.token_ids for o in outputs["graphed"].outputs for c in o.completions] == \
        [c.token_ids for o in first.outputs for c in o.completions]


def test_lora_slots_match_the_attached_reference_in_bf16():
    from ember.models import LoraAdapter, attach

    loaded = load("tiny-qwen3", dtype="bf16", device="cuda")
    adapter = LoraAdapter.create(loaded.model, r=8, alpha=16, seed=0, dtype=torch.bfloat16)
    for _, b in adapter.weights.values():
        b.data.normal_(0, 0.3)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[0])], device="cuda")
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.set_adapter(engine.load_adapter(adapter))
    with torch.no_grad():
        slotted = loaded.model(ids).float()
        engine.set_adapter(None)
        attach(loaded.model, adapter)
        attached = loaded.model(ids).float()
        attach(loaded.model, None)
        exact = load("tiny-qwen3", device="cuda").model  # fp32 twin: the reference both are measured against
        attach(exact, adapter.to(dtype=torch.float32))
        reference = exact(ids)
    slot_error, attach_error = ((x - reference).abs().max().item() for x in (slotted, attached))
    assert slot_error <= 2 * attach_error + 0.05, (slot_error, attach_error)  # bf16 rounding, nothing more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_kernel_matches_the_two_gemm_reference(dtype):
    from ember.models.lora_kernel import lora_add_

    generator = torch.Generator(device="cuda").manual_seed(0)
    for rows, in_features, out_features, rank in ((1, 2560, 1024, 16), (8, 100, 70, 32), (64, 9728, 2560, 16)):
        x = torch.randn(rows, in_features, device="cuda", generator=generator).to(dtype)
        a = (torch.randn(rank, in_features, device="cuda", generator=generator) / in_features ** 0.5).to(dtype)
        b = torch.randn(out_features, rank, device="cuda", generator=generator).to(dtype)
        y = torch.randn(rows, out_features, device="cuda", generator=generator).to(dtype)
        reference = torch.addmm(y.float(), (x.float() @ a.float().t()).to(dtype).float(), b.float().t())
        fused = lora_add_(y.clone(), x, a, b).float()
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(fused, reference, atol=tolerance, rtol=tolerance)


def test_engine_with_fused_lora_matches_the_unfused_path():
    from ember.models import LoraAdapter
    from ember.models.lora import LoraLinear

    loaded = load("tiny-qwen3")
    loaded.model.to("cuda")
    adapter = LoraAdapter.create(loaded.model, r=5, alpha=10, seed=3)
    for _, b in adapter.weights.values():
        b.data.normal_(0, 0.3)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for fused in (True, False):
        LoraLinear.fused = fused
        try:
            engine = Engine(loaded.model, loaded.tokenizer, prefix_cache=False)
            engine.set_adapter(engine.load_adapter(adapter))
            results.append(engine.generate(PROMPTS, n=2, sampling=params))
        finally:
            LoraLinear.fused = True
    for a, b in zip(*(r.outputs for r in results)):
        for x, y in zip(a.completions, b.completions):
            assert x.token_ids == y.token_ids
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_the_dispatch_report_shows_the_fast_paths_taken(monkeypatch):
    """bf16 causal prefill on a fused SDPA backend (not the math fallback); decode-sized LoRA on the fused kernel."""
    from ember.models import LoraAdapter, dispatch

    loaded = load("tiny-qwen3")
    loaded.model.to("cuda", torch.bfloat16)
    monkeypatch.setenv(dispatch.ENV, "1")
    with torch.no_grad():
        loaded.model(torch.randint(0, 100, (2, 64), device="cuda"))
    assert all("sdpa:math" not in p["attention"][0] and p["attention"][0].endswith("mask=causal")
               for p in dispatch.last().paths.values())
    engine = Engine(loaded.model, loaded.tokenizer, prefix_cache=False, cuda_graphs=False)
    engine.set_adapter(engine.load_adapter(LoraAdapter.create(loaded.model, r=4, alpha=8, seed=1,
                                                              dtype=torch.bfloat16)))
    engine.generate(PROMPTS[:1], sampling=SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert all(set(p["lora"]) == {"fused"} for p in dispatch.last().paths.values())  # the last decode step


def test_shared_prompt_kv_on_cuda_matches_the_dense_graph_decode():
    """The shared prompt cache against the dense cache, each with its CUDA graph, and the shared one eager,
    fp32, on the GPU; a second batch of the same buckets replays the shared graph."""
    loaded = load("tiny-qwen3")
    loaded.model.to("cuda")
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=2, ignore_eos=True, logprobs=0)
    dense = Engine(loaded.model, loaded.tokenizer).generate(PROMPTS, n=4, sampling=params)
    engine = Engine(loaded.model, loaded.tokenizer, share_prompt_kv=True)
    shared = engine.generate(PROMPTS, n=4, sampling=params)
    again = engine.generate(PROMPTS, n=4, sampling=params)
    eager = Engine(loaded.model, loaded.tokenizer, share_prompt_kv=True, cuda_graphs=False).generate(
        PROMPTS, n=4, sampling=params)
    assert shared.timings["capture"] > 0 and again.timings.get("capture", 0) == 0
    assert [c.token_ids for o in again.outputs for c in o.completions] == \
        [c.token_ids for o in eager.outputs for c in o.completions]
    for x, y in zip(dense.outputs, shared.outputs):
        for a, b in zip(x.completions, y.completions):
            assert a.token_ids == b.token_ids
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)


def test_shared_prompt_attention_in_bf16_on_cuda_matches_fp32_sdpa():
    """`attend` over a bf16 cache at a 4B-like head shape (8 candidates of a 4,096-token prompt) against fp32
    SDPA over the dense rows, within bf16 rounding."""
    config = preset_config("qwen3-4b", num_layers=1)
    group, prompt_slots, generated = 8, 4096, 16
    cache = SharedPromptCache(config, group, group, prompt_slots, prompt_slots + generated, torch.bfloat16, "cuda")
    torch.manual_seed(0)
    cache.prompt.normal_()
    cache.storage.normal_()
    cache.key_valid[:, :prompt_slots + generated] = True
    q = torch.randn(group, config.num_heads, 1, config.head_dim, device="cuda").bfloat16()
    keys, values = cache.storage[0, 0], cache.storage[0, 1]  # (B, Hkv, S_g, D)
    out = cache.attend(0, q, keys, values)
    dense_k = torch.cat([cache.prompt[0, 0].expand(group, -1, -1, -1), keys], dim=2).float()
    dense_v = torch.cat([cache.prompt[0, 1].expand(group, -1, -1, -1), values], dim=2).float()
    expected = F.scaled_dot_product_attention(q.float(), dense_k, dense_v, enable_gqa=True)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
