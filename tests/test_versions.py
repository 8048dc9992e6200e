"""Per-layer versions: derived from the weights in use, carried by prefix-cache blocks, reusable depth after a
swap, engines over different models sharing one cache, and boundary hidden states in blocks."""

import pytest
import torch

from ember.engine import Engine, KVCache, SamplingParams
from ember.engine.prefix_cache import PrefixCache
from ember.models import LoraAdapter, Step, load
from ember.models.loader import random_model
from ember.models.presets import preset_config

SHARED = "You are a careful assistant. Answer in JSON with keys name and code. "
DOCS = [SHARED + "Alice has code 4821.", SHARED + "Bob has code 1234."]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _deep_engine(layers=4, cache=None, seed=0):
    model = random_model(preset_config("tiny-llama", num_layers=layers), torch.float32, torch.device("cpu"), seed)
    tokenizer = load("tiny-llama").tokenizer
    return Engine(model, tokenizer, prefix_cache=cache if cache is not None else PrefixCache(block_size=8))


def _adapter(model, layers, seed):
    adapter = LoraAdapter.create(model, r=2, alpha=4, targets=("k_proj", "v_proj", "up_proj"), layers=layers,
                                 seed=seed)
    with torch.no_grad():
        for _, b in adapter.weights.values():
            b.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return adapter


def _same(a, b):
    for x, y in zip(a.outputs, b.outputs):
        assert x.completions[0].token_ids == y.completions[0].token_ids
        assert x.completions[0].logprobs == pytest.approx(y.completions[0].logprobs, abs=1e-5)


def test_versions_follow_the_weights_in_use():
    engine = _deep_engine()
    base = engine.versions
    assert len(set(base.layers)) == 1 and base.layers[0] == base.model
    upper = engine.load_adapter(_adapter(engine.model, [2, 3], seed=1), "upper")
    engine.set_adapter(upper)
    swapped = engine.versions
    assert swapped.layers[:2] == base.layers[:2] and swapped.layers[2] != swapped.layers[3] != base.layers[3]
    assert swapped.reusable_depth(base.layers) == 2
    twin = engine.load_adapter(_adapter(engine.model, [2, 3], seed=1), "twin")  # same content, other name
    engine.set_adapter(twin)
    assert engine.versions == swapped
    engine.set_adapter(None)
    assert engine.versions == base
    with torch.no_grad():
        engine.model.model.norm.weight[0] += 1.0  # a base weight changed in place: a new fingerprint
    changed = engine.versions
    assert changed.model != base.model
    engine.model.model.layers[1].self_attn.k_proj.weight.data[3, 1] += 1e-3  # one value, through .data
    assert engine.versions == changed  # torch does not count .data writes...
    engine.weights_changed()
    moved = engine.versions
    assert moved.model != changed.model  # ...and the fingerprint sees any value once asked
    row = engine.model.model.layers[0].mlp.up_proj.weight.data[2]
    row[[0, 1]] = row[[1, 0]].clone()  # two values swapped: the same sums, another model
    engine.weights_changed()
    assert engine.versions.model != moved.model


def test_blocks_of_an_old_adapter_are_reusable_to_the_first_changed_layer():
    engine = _deep_engine()
    reference = _deep_engine(cache=False)
    engine.generate(DOCS, sampling=GREEDY)
    tokens = engine.tokenizer.encode(DOCS[0])
    adapter = _adapter(engine.model, [2, 3], seed=1)
    engine.set_adapter(engine.load_adapter(adapter, "upper"))
    reference.set_adapter(reference.load_adapter(adapter, "upper"))
    versions = engine.versions
    stale = engine.prefix_cache.match(tokens, versions, min_depth=0)
    assert stale.tokens > 0 and stale.depth == 2
    engine.prefix_cache.release(stale)
    assert engine.prefix_cache.cached_tokens(tokens, versions) == 0  # never served as if fully valid
    after = engine.generate(DOCS, sampling=GREEDY)
    assert after.extra["prefix_cache"]["tokens_reused"] == len(DOCS) * 8 * (len(SHARED) // 8)  # warmed, shared
    _same(after, reference.generate(DOCS, sampling=GREEDY))
    assert engine.prefix_cache.stats.replaced > 0  # stale blocks were overwritten, not duplicated
    engine.set_adapter(None)
    reference.set_adapter(None)
    _same(engine.generate(DOCS, sampling=GREEDY), reference.generate(DOCS, sampling=GREEDY))
    held = len(engine.prefix_cache)
    engine.set_adapter("upper")
    assert engine.prefix_cache.invalidate(engine.versions) == held  # every block is stale for the adapter


def test_engines_over_different_models_never_share_kv():
    shared = PrefixCache(block_size=8)
    first, other_seed = _deep_engine(2, shared, seed=0), _deep_engine(2, shared, seed=1)
    other_family = Engine(load("tiny-qwen3").model, load("tiny-qwen3").tokenizer, prefix_cache=shared)
    first.generate(DOCS, sampling=GREEDY)
    for engine, reference in ((other_seed, _deep_engine(2, False, seed=1)),
                              (other_family, Engine(load("tiny-qwen3").model, load("tiny-qwen3").tokenizer,
                                                    prefix_cache=False))):
        result = engine.generate(DOCS, sampling=GREEDY)
        assert result.extra["prefix_cache"]["tokens_reused"] == len(DOCS) * 8 * (len(SHARED) // 8)  # own warm-up
        _same(result, reference.generate(DOCS, sampling=GREEDY))
    assert first.generate(DOCS, sampling=GREEDY).extra["prefix_cache"]["tokens_recomputed"] == \
        sum(len(d) for d in DOCS) - sum(8 * ((len(d) - 1) // 8) for d in DOCS)


def test_blocks_store_boundary_states_that_recompute_upper_layers():
    engine = _deep_engine(4, PrefixCache(block_size=8, boundary_layers=(2,)))
    without = _deep_engine(4, PrefixCache(block_size=8))
    engine.generate(DOCS[:1], sampling=GREEDY)
    without.generate(DOCS[:1], sampling=GREEDY)
    cache = engine.prefix_cache
    hidden_bytes = sum(b.hidden.numel() * 4 for b in cache._blocks.values())
    assert hidden_bytes > 0 and cache.bytes_held == without.prefix_cache.bytes_held + hidden_bytes
    tokens = engine.tokenizer.encode(DOCS[0])
    match = cache.match(tokens, engine.versions)
    kv, hidden = cache.gather(match), cache.gather_hidden(match)  # (L, 2, H, m, D), (1, m, hidden)
    cache.release(match)
    m = match.tokens
    fresh = KVCache(engine.model.config, 1, m, torch.float32, "cpu")
    with torch.no_grad():
        engine.model.run(Step(positions=torch.arange(m)[None], kv=fresh, slots=0, layers=(2, 4), causal=True,
                              logits="none"), hidden=hidden)
    recomputed = fresh.read(0, torch.arange(m))
    assert (recomputed[2:] - kv[2:]).abs().max().item() < 1e-5
    with pytest.raises(Exception, match="boundary hidden states"):
        without.prefix_cache.gather_hidden(without.prefix_cache.match(tokens, without.versions))


def test_boundary_layers_beyond_the_model_are_a_clear_error():
    from ember.errors import GenerationError

    engine = _deep_engine(2, PrefixCache(block_size=8, boundary_layers=(3,)))
    with pytest.raises(GenerationError, match=r"boundary_layers: expected layers in \[0, 2\].*found \(3,\)"):
        engine.generate(DOCS, sampling=GREEDY)
    with pytest.raises(GenerationError, match="max_workspaces: expected >= 1"):
        Engine(engine.model, engine.tokenizer, max_workspaces=0)


def test_a_stale_block_held_by_a_match_is_not_overwritten_under_it():
    engine = _deep_engine()
    engine.generate(DOCS[:1], sampling=GREEDY)
    tokens = engine.tokenizer.encode(DOCS[0])
    engine.set_adapter(engine.load_adapter(_adapter(engine.model, [1], seed=2)))
    held = engine.prefix_cache.match(tokens, engine.versions, min_depth=0)  # e.g. a policy reusing layer 0
    before = engine.prefix_cache.gather(held).clone()
    engine.generate(DOCS[:1], sampling=GREEDY)
    assert torch.equal(engine.prefix_cache.gather(held), before) and held.depth == 1
    assert engine.prefix_cache.stats.insert_skipped > 0
    engine.prefix_cache.release(held)
    engine.generate(DOCS[:1], sampling=GREEDY)
    assert engine.prefix_cache.cached_tokens(tokens, engine.versions) == held.tokens  # replaced once free


def test_fingerprint_handles_empty_and_scalar_parameters():
    from ember.models.versions import model_fingerprint

    model = load("tiny-llama").model
    before = model_fingerprint(model)
    model.register_parameter("empty", torch.nn.Parameter(torch.zeros(4, 0)))
    model.register_parameter("scalar", torch.nn.Parameter(torch.tensor(1.0)))
    after = model_fingerprint(model)
    with torch.no_grad():
        model.scalar += 1
    assert len({before, after, model_fingerprint(model)}) == 3
