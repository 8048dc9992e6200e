"""Prefix KV cache: reuse gives the outputs of full prefill, across overlaps, evictions and invalidation."""

import pytest
import torch

from ember.engine import Engine, SamplingParams
from ember.engine.prefix_cache import PrefixCache
from ember.errors import GenerationError
from ember.models import load
from ember.models.versions import LayerVersions

V = LayerVersions("model-a", ("v", "v"))  # a two-layer model's versions, for direct cache tests

SHARED = "You are a careful assistant. Answer in JSON with keys name and code. "  # 70 chars = 70 tokens
DOCS = [SHARED + "Alice has code 4821.", SHARED + "Bob has code 1234, and Carol has 9", SHARED[:40] + "Dan?",
        "Unrelated prompt with nothing shared", SHARED + "Alice has code 4821. And Eve?"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def loaded():
    return load("tiny-qwen3")


def _engine(loaded, cache):
    return Engine(loaded.model, loaded.tokenizer, prefix_cache=cache)


def _assert_same(a, b):
    for x, y in zip(a.outputs, b.outputs):
        for cx, cy in zip(x.completions, y.completions):
            assert cx.token_ids == cy.token_ids
            assert cx.logprobs == pytest.approx(cy.logprobs, abs=1e-5)


def test_reuse_matches_full_prefill_across_calls_and_partial_overlaps(loaded):
    reference = _engine(loaded, False).generate(DOCS, n=2, sampling=GREEDY)
    engine = _engine(loaded, PrefixCache(block_size=8))
    first = engine.generate(DOCS[:2], n=2, sampling=GREEDY)
    second = engine.generate(DOCS, n=2, sampling=GREEDY)  # partial overlaps with what is cached
    third = engine.generate(DOCS[::-1], n=2, sampling=GREEDY)
    _assert_same(first, type(reference)(reference.outputs[:2], {}, 0, 0))
    _assert_same(second, reference)
    _assert_same(third, type(reference)(reference.outputs[::-1], {}, 0, 0))
    assert second.extra["prefix_cache"]["tokens_reused"] > 0
    assert third.extra["prefix_cache"]["tokens_reused"] >= 8 * (sum(len(d) for d in DOCS) // 8) - 8 * len(DOCS)


def test_shared_prefix_within_one_batch_is_prefilled_once(loaded):
    docs = [SHARED + f"Document number {i} says hello." for i in range(6)]
    engine = _engine(loaded, PrefixCache(block_size=8))
    result = engine.generate(docs, sampling=GREEDY)
    stats = result.extra["prefix_cache"]
    common = len(SHARED + "Document number ")  # what all six share
    shared_blocks = common // 8 * 8
    total = sum(len(d) for d in docs)
    assert stats["tokens_recomputed"] == total - len(docs) * shared_blocks + shared_blocks
    _assert_same(result, _engine(loaded, False).generate(docs, sampling=GREEDY))


def test_evictions_mid_run_keep_outputs_exact(loaded):
    kv_block_bytes = 2 * 2 * 2 * 8 * 16 * 4  # layers * (k,v) * kv heads * block * head dim * fp32
    engine = _engine(loaded, PrefixCache(block_size=8, max_bytes=5 * kv_block_bytes))
    other = ["Another long and different prompt that fills the cache with blocks: " + str(i) for i in range(3)]
    references = {id(p): _engine(loaded, False).generate(p, sampling=GREEDY) for p in (DOCS, other)}
    for prompts in (DOCS, other, DOCS, other):
        _assert_same(engine.generate(prompts, sampling=GREEDY), references[id(prompts)])
    assert engine.prefix_cache.stats.evictions > 0
    assert engine.prefix_cache.bytes_held <= 5 * kv_block_bytes
    last = engine.generate(DOCS[:1], sampling=GREEDY).extra["prefix_cache"]
    assert last["bytes_held"] == engine.prefix_cache.bytes_held and last["blocks"] == len(engine.prefix_cache)


def test_invalidate_by_prefix_and_all(loaded):
    engine = _engine(loaded, PrefixCache(block_size=8))
    engine.generate(DOCS, sampling=GREEDY)
    tokens = loaded.tokenizer.encode(SHARED)
    before = len(engine.prefix_cache)
    versions = engine.versions
    assert engine.prefix_cache.invalidate(versions, prefix=tokens[:16]) > 0
    assert engine.prefix_cache.cached_tokens(tokens, versions) == 8  # the first block survives
    assert len(engine.prefix_cache) < before
    engine.prefix_cache.invalidate()
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.bytes_held == 0
    with pytest.raises(GenerationError, match="version"):
        engine.prefix_cache.invalidate(prefix=tokens)


def test_pinned_and_in_use_blocks_are_not_evicted(loaded):
    cache = PrefixCache(block_size=8, max_bytes=10 ** 9)
    engine = _engine(loaded, cache)
    assert engine.pin_prefix(SHARED) == len(SHARED) // 8
    versions = engine.versions
    pinned = cache.cached_tokens(loaded.tokenizer.encode(SHARED), versions)
    in_use = cache.match(loaded.tokenizer.encode(DOCS[3]) + [5] * 20, versions)  # nothing cached: empty
    assert in_use.tokens == 0
    engine.generate(DOCS[3:4], sampling=GREEDY)
    held = cache.match(loaded.tokenizer.encode(DOCS[3]), versions)
    cache.max_bytes = 0  # every unpinned, unused block must go now
    cache.insert(list(range(4, 12)), versions, lambda a, b: torch.zeros(2, 2, 2, b - a, 16))
    assert cache.cached_tokens(loaded.tokenizer.encode(SHARED), versions) == pinned
    assert cache.cached_tokens(loaded.tokenizer.encode(DOCS[3]), versions) == held.tokens > 0
    cache.release(held)
    engine.pin_prefix(SHARED, pinned=False)
    cache.insert(list(range(4, 12)), versions, lambda a, b: torch.zeros(2, 2, 2, b - a, 16))
    assert len(cache) == 0 and cache.stats.insert_skipped >= 1


def test_match_always_leaves_a_token_to_compute():
    cache = PrefixCache(block_size=4)
    tokens = list(range(10, 18))  # exactly two blocks
    cache.insert(tokens, V, lambda a, b: torch.ones(2, 2, 1, b - a, 2))
    match = cache.match(tokens, V)
    assert match.tokens == 4 and cache.gather(match).shape == (2, 2, 1, 4, 2) and match.depth == 2
    assert cache.match(tokens + [1], V).tokens == 8
    assert cache.match(tokens + [1], LayerVersions("model-b", V.layers)).tokens == 0


def test_turning_the_cache_off(loaded):
    engine = _engine(loaded, PrefixCache(block_size=8))
    engine.generate(DOCS, sampling=GREEDY)
    off = engine.generate(DOCS, sampling=GREEDY, use_prefix_cache=False)
    assert "prefix_cache" not in off.extra
    with pytest.raises(GenerationError, match="no prefix cache"):
        _engine(loaded, False).pin_prefix("x")
