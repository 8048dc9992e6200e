"""CUDA paths: the same engine on GPU agrees with the CPU run (skipped without a GPU)."""

import pytest
import torch

from ember.engine import Engine, SamplingParams
from ember.models import load

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
