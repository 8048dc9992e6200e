"""Prompt K/V stored once per prompt (SharedPromptCache): the same generations as the dense cache that copies
it into every candidate row, with and without prefix-cache hits, in a fraction of the memory."""

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from ember.engine import Engine, KVCache, SamplingParams
from ember.engine.prefill import prefill
from ember.engine.prefix_cache import PrefixCache
from ember.engine.shared_cache import SharedPromptCache, make_cache
from ember.engine.steps import append_step, static_step
from ember.errors import GenerationError, StepError
from ember.models import load
from ember.models.presets import preset_config
from ember.models.step import Step
from ember.models.versions import LayerVersions

PROMPTS = ["Alice has code 4821. What is Alice's code?", "Hi", "Bob keeps a red box and a blue one."]
SAMPLED = SamplingParams(temperature=1.0, max_tokens=10, seed=5, ignore_eos=True, logprobs=0)


def _tokens_and_logprobs(result):
    completions = [c for out in result.outputs for c in out.completions]
    return [c.token_ids for c in completions], [lp for c in completions for lp in c.logprobs]


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-qwen3", "tiny-llama"])
def test_shared_prompt_generations_equal_the_dense_cache(family):
    loaded = load(family)
    dense = Engine(loaded.model, loaded.tokenizer, prefix_cache=False)
    shared = Engine(loaded.model, loaded.tokenizer, prefix_cache=False, share_prompt_kv=True)
    tokens, logprobs = _tokens_and_logprobs(dense.generate(PROMPTS, n=3, sampling=SAMPLED))
    shared_tokens, shared_logprobs = _tokens_and_logprobs(shared.generate(PROMPTS, n=3, sampling=SAMPLED))
    assert shared_tokens == tokens
    assert shared_logprobs == pytest.approx(logprobs, abs=1e-4)


def test_prefix_cache_hits_load_once_per_prompt_and_match_full_prefill():
    loaded = load("tiny-qwen3")
    shared_prefix = "A long instruction that every prompt of the batch shares, word for word. "
    prompts = [shared_prefix + "First?", shared_prefix + "Second question here?"]
    reference = Engine(loaded.model, loaded.tokenizer, prefix_cache=False).generate(prompts, n=4, sampling=SAMPLED)
    engine = Engine(loaded.model, loaded.tokenizer, prefix_cache=PrefixCache(block_size=8), share_prompt_kv=True)
    engine.generate(prompts, n=4, sampling=SAMPLED)
    again = engine.generate(prompts, n=4, sampling=SAMPLED)  # the prompts' blocks now come from the prefix cache
    assert again.extra["prefix_cache"]["tokens_reused"] > 0
    tokens, logprobs = _tokens_and_logprobs(reference)
    again_tokens, again_logprobs = _tokens_and_logprobs(again)
    assert again_tokens == tokens
    assert again_logprobs == pytest.approx(logprobs, abs=1e-4)


def test_prefill_stores_each_prompt_once_and_one_candidate_stays_dense():
    loaded = load("tiny-qwen2")
    config = loaded.model.config
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    fresh = functools.partial(make_cache, config, dtype=torch.float32, device="cpu")
    versions = LayerVersions("m", ("v",) * config.num_layers)
    with torch.inference_mode():
        dense, _ = prefill(loaded.model, prompts, 4, 6, 0, fresh, versions)
        shared, _ = prefill(loaded.model, prompts, 4, 6, 0, fresh, versions, share_prompt=True)
        single, _ = prefill(loaded.model, prompts, 1, 6, 0, fresh, versions, share_prompt=True)
    assert isinstance(shared, SharedPromptCache) and type(single) is KVCache
    width = max(map(len, prompts))
    assert shared.prompt.shape[2] == len(prompts) and shared.prompt_slots == width
    per_slot = dense.nbytes // (dense.batch * dense.capacity)  # bytes of one row's slot over all layers
    assert dense.nbytes == per_slot * len(prompts) * 4 * (width + 6)
    assert shared.nbytes == per_slot * (len(prompts) * width + len(prompts) * 4 * 6)
    for row in range(shared.batch):  # every candidate row reads its prompt's K/V as the dense copy holds it
        slots = torch.arange(width)
        torch.testing.assert_close(shared.read(row, slots), dense.read(row, slots), atol=0, rtol=0)
    assert torch.equal(shared.key_valid, dense.key_valid)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # multi-query, grouped, multi-head (4 query heads)
def test_shared_attention_equals_attention_over_both_regions_with_padding(kv_heads, dtype, tolerance):
    """`attend` (one softmax over the prompt copy and the row's own keys) against fp32 SDPA over the dense
    rows; a bf16 cache within bf16 rounding of the scores, weights and output."""
    config = preset_config("tiny-qwen2", num_layers=1, num_kv_heads=kv_heads)
    torch.manual_seed(0)
    group, prompts, prompt_slots, generated = 3, 2, 5, 4
    cache = SharedPromptCache(config, prompts * group, group, prompt_slots, prompt_slots + generated, dtype, "cpu")
    heads, dim = config.num_heads, config.head_dim
    cache.prompt.normal_()
    cache.storage.normal_()
    cache.key_valid[:, :prompt_slots] = True
    cache.key_valid[:group, :2] = False  # the first prompt is left-padded
    cache.key_valid[:, prompt_slots:prompt_slots + 3] = True  # three generated tokens so far
    cache.key_valid[4, prompt_slots + 1] = False  # and one row with a hole
    q = torch.randn(prompts * group, heads, 1, dim).to(dtype)
    keys, values = cache.storage[0, 0, :, :, :3], cache.storage[0, 1, :, :, :3]
    out = cache.attend(0, q, keys, values)
    assert out.dtype == dtype
    dense_k = torch.cat([cache.prompt[0, 0].repeat_interleave(group, 0), keys], dim=2)  # (B, Hkv, S_p + 3, D)
    dense_v = torch.cat([cache.prompt[0, 1].repeat_interleave(group, 0), values], dim=2)
    mask = cache.key_valid[:, None, None, :prompt_slots + 3]  # (B, 1, 1, S)
    expected = F.scaled_dot_product_attention(q.float(), dense_k.float(), dense_v.float(), attn_mask=mask,
                                              enable_gqa=True)
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_static_step_over_a_shared_cache_equals_the_dynamic_step():
    loaded = load("tiny-qwen3")
    model, config = loaded.model, loaded.model.config
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS[:2]]
    fresh = functools.partial(make_cache, config, dtype=torch.float32, device="cpu")
    versions = LayerVersions("m", ("v",) * config.num_layers)
    with torch.inference_mode():
        caches = [prefill(model, prompts, 2, 4, 0, fresh, versions, share_prompt=True)[0] for _ in range(2)]
        caches[1].sync_slot()
        for token in (7, 9, 11):
            ids = torch.full((4, 1), token)
            dynamic = model.run(append_step(caches[0], 4, 1, logits="last"), input_ids=ids).logits
            static = model.run(static_step(caches[1], logits="last"), input_ids=ids).logits
            caches[1].advance_static()
            caches[1].length += 1
            torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)
    assert torch.equal(caches[1].key_valid, caches[0].key_valid)


def test_a_prompt_region_sized_up_to_its_bucket_decodes_as_the_dense_cache():
    """A graph workspace rounds the prompt region up (the prompt leaves its last slots unwritten): after
    `start_decode` the fixed-shape steps a CUDA graph replays give the dense cache's logits."""
    loaded = load("tiny-qwen2")
    model, config = loaded.model, loaded.model.config
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    versions = LayerVersions("m", ("v",) * config.num_layers)
    dense_cache = functools.partial(make_cache, config, dtype=torch.float32, device="cpu")
    bucketed = lambda batch, capacity, group, prompt_slots: make_cache(  # noqa: E731
        config, batch, capacity + 16, torch.float32, "cpu", group, prompt_slots + 11)
    with torch.inference_mode():
        dense, first = prefill(model, prompts, 2, 4, 0, dense_cache, versions)
        shared, shared_first = prefill(model, prompts, 2, 4, 0, bucketed, versions, share_prompt=True)
        assert shared.prompt_slots == max(map(len, prompts)) + 11 and shared.length < shared.prompt_slots
        shared.start_decode()
        shared.sync_slot()
        torch.testing.assert_close(shared_first, first, atol=0, rtol=0)
        for token in (7, 9, 11):
            ids = torch.full((6, 1), token)
            expected = model.run(append_step(dense, 6, 1, logits="last"), input_ids=ids).logits
            static = model.run(static_step(shared, logits="last"), input_ids=ids).logits
            shared.advance_static()
            shared.length += 1
            torch.testing.assert_close(static, expected, atol=1e-5, rtol=1e-5)
    assert not shared.key_valid[:, dense.length - 3:shared.prompt_slots].any()  # the region's unwritten slots


def test_wrong_writes_loads_and_steps_are_clear_errors():
    config = preset_config("tiny-qwen2")
    cache = SharedPromptCache(config, 4, 2, 6, 10, torch.float32, "cpu")
    k = torch.zeros(3, config.num_kv_heads, 1, config.head_dim)
    with pytest.raises(GenerationError, match="expected a write of 2 rows below slot 6 or of 4 rows from it"):
        cache.write(0, 2, k, k)
    kv = torch.zeros(config.num_layers, 2, config.num_kv_heads, 3, config.head_dim)
    with pytest.raises(GenerationError, match="rows of one prompt"):
        cache.load(slice(1, 3), 0, kv, 3)
    with pytest.raises(GenerationError, match="per-layer key validity"):
        cache.load(slice(0, 2), 0, kv, 3, torch.ones(config.num_layers, 3, dtype=torch.bool))
    with pytest.raises(GenerationError, match="beyond the prompt region"):
        cache.load(slice(0, 2), 4, kv, 3)
    with pytest.raises(GenerationError, match="group dividing the batch"):
        SharedPromptCache(config, 4, 3, 6, 10, torch.float32, "cpu")
    with pytest.raises(GenerationError, match="prompt slots < capacity"):
        SharedPromptCache(config, 4, 2, 10, 10, torch.float32, "cpu")
    with pytest.raises(GenerationError, match="decode starts at slot 6"):
        cache.sync_slot()
    with pytest.raises(StepError, match="Step.attend"):
        Step(positions=torch.zeros(4, 1, dtype=torch.long), kv=cache, slots=6, attend=cache.attend,
             query_hook=lambda *a: None)


def test_prompt_kv_bench_sizes_both_caches_at_a_preset_shape(tmp_path):
    from ember.bench.prompt_kv import cache_bytes, main

    config = preset_config("qwen3-4b")
    sizes = cache_bytes("qwen3-4b", torch.bfloat16, 1, 64, 4096, 256)
    slot = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2  # bytes of one token's K/V
    assert sizes["dense_bytes"] == 64 * (4096 + 256) * slot
    assert sizes["shared_bytes"] == (4096 + 64 * 256) * slot
    out = tmp_path / "prompt_kv.json"
    assert main(["--shape", "tiny-qwen2", "--prompt", "8", "--gen", "2", "--candidates", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["memory"]["dense_over_shared"] == pytest.approx(3 * 10 / (8 + 3 * 2))
    with pytest.raises(GenerationError, match="--shape: expected one of"):
        main(["--shape", "nope", "--out", str(out)])
