"""The step context: explicit positions, layer ranges, boundary states, the K/V hook, re-rotation, and the plain
differentiable forward against the cached path."""

import subprocess
import sys

import pytest
import torch

from ember.engine import KVCache
from ember.engine.steps import append_step
from ember.errors import StepError
from ember.models import load, rerotate
from ember.models.loader import random_model
from ember.models.presets import preset_config
from ember.models.step import Step, causal_step

TEXT = "The code for Alice is 4821. The code for Bob is 1234. Alice?"


def _cache(model, batch, capacity):
    return KVCache(model.config, batch, capacity, torch.float32, "cpu")


def _deep(family="tiny-qwen3", layers=6):
    return random_model(preset_config(family, num_layers=layers), torch.float32, torch.device("cpu"), seed=3)


def test_models_import_nothing_from_the_engine():
    code = "import sys, ember.models; print(sorted(m for m in sys.modules if m.startswith('ember.engine')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plain_forward_equals_cached_path_on_padded_batch(family):
    loaded = load(family)
    prompts = [loaded.tokenizer.encode(p) for p in (TEXT, "Hi", "A middle one")]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    valid = ids != 0
    plain = loaded.model(ids, valid)  # (b, T, V), differentiable
    assert plain.requires_grad
    cache = _cache(loaded.model, 3, width)
    with torch.no_grad():
        cached = loaded.model.run(append_step(cache, 3, width, valid), input_ids=ids).logits
    torch.testing.assert_close(plain[valid], cached[valid], atol=1e-5, rtol=1e-5)


def test_backward_through_the_plain_forward():
    model = load("tiny-llama").model
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model(ids).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_layer_ranges_compose_exactly():
    model = _deep(layers=6)
    ids = torch.tensor([[5, 17, 33, 60, 8, 9, 41]])
    positions = torch.arange(7)[None]
    with torch.no_grad():
        full = model.run(Step(positions=positions, capture=(2, 4)), input_ids=ids)
        for split in (1, 2, 3, 5):
            low = model.run(Step(positions=positions, layers=(0, split), capture=(split,)), input_ids=ids)
            assert low.logits is None
            high = model.run(Step(positions=positions, layers=(split, 6)), hidden=low.boundary[split])
            assert (high.logits - full.logits).abs().max().item() < 1e-6
        middle = model.run(Step(positions=positions, layers=(2, 4)), hidden=full.boundary[2])
        assert (middle.hidden - full.boundary[4]).abs().max().item() < 1e-6
    with pytest.raises(StepError, match="need hidden states"):
        model.run(Step(positions=positions, layers=(3, 6)), input_ids=ids)
    with pytest.raises(StepError, match="expected 0 <= a < b <= 6"):
        model.run(Step(positions=positions, layers=(4, 9)), input_ids=ids)


def test_layer_ranges_through_the_cache_equal_a_full_prefill():
    """Layers [0, N) then [N, L) from the boundary, both writing the cache: the same K/V and logits."""
    model = _deep(layers=4)
    ids = torch.tensor([[5, 17, 33, 60, 8, 9, 41]])
    whole, split = _cache(model, 1, 7), _cache(model, 1, 7)
    with torch.no_grad():
        reference = model.run(append_step(whole, 1, 7), input_ids=ids).logits
        step = append_step(split, 1, 7, layers=(0, 2), capture=(2,))
        low = model.run(step, input_ids=ids)
        step.layers = (2, 4)
        high = model.run(step, hidden=low.boundary[2])
    assert (high.logits - reference).abs().max().item() < 1e-6
    assert torch.equal(whole.storage, split.storage)


def test_tokens_removed_from_a_context_keep_their_positions(family):
    """K/V of a context with some tokens removed, loaded at the original positions, gives the logits of a
    reference that masks those tokens out."""
    loaded = load(family)
    model = loaded.model
    context = loaded.tokenizer.encode(TEXT)
    question = loaded.tokenizer.encode(" Bob's code?")
    keep = torch.tensor([i for i in range(len(context)) if i % 3 != 1])  # a third of the tokens removed
    n, m, q = len(context), len(keep), len(question)
    with torch.no_grad():
        # K/V of the kept tokens computed at their original positions (the gaps stay), in a fresh cache
        source = _cache(model, 1, m)
        model.run(append_step(source, 1, m, positions=keep[None]), input_ids=torch.tensor(context)[keep][None])
        compact = _cache(model, 1, m + q)
        compact.load(slice(0, 1), 0, source.read(0, torch.arange(m)), next_position=n)
        compact.skip_to(m)
        ours = model.run(append_step(compact, 1, q), input_ids=torch.tensor([question])).logits
        # the reference: the whole sequence at positions 0..n+q-1 with the removed tokens masked out
        ids = torch.tensor([context + question])
        mask = torch.ones(1, n + q, dtype=torch.bool)
        mask[0, [i for i in range(n) if i % 3 == 1]] = False
        reference = model(ids, mask, positions=torch.arange(n + q)[None])[:, n:]
    assert compact.next_position.tolist() == [n + q]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_selected_slots_of_a_full_cache_keep_their_positions():
    """A cache compacted to a subset of another cache's slots equals the full cache with the others masked."""
    loaded = load("tiny-llama")
    model = loaded.model
    context = loaded.tokenizer.encode(TEXT)
    question = torch.tensor([loaded.tokenizer.encode(" Bob?")])
    n, q = len(context), question.shape[1]
    keep = torch.tensor([i for i in range(n) if i % 4 != 2])
    with torch.no_grad():
        full = _cache(model, 1, n + q)
        model.run(append_step(full, 1, n), input_ids=torch.tensor([context]))
        compact = _cache(model, 1, len(keep) + q)
        compact.load(slice(0, 1), 0, full.read(0, keep), next_position=n)
        compact.skip_to(len(keep))
        full.key_valid[0, [i for i in range(n) if i % 4 == 2]] = False
        full.has_padding = True
        masked = model.run(append_step(full, 1, q), input_ids=question).logits
        ours = model.run(append_step(compact, 1, q), input_ids=question).logits
    torch.testing.assert_close(ours, masked, atol=1e-5, rtol=1e-5)


def test_kv_hook_sees_post_rope_kv_and_its_output_is_cached():
    model = _deep(layers=3)
    ids = torch.tensor([[5, 17, 33, 60]])
    seen = []

    def hook(layer, k, v):
        seen.append((layer, k.shape, v.shape))
        return (k, v * 0) if layer == 1 else (k, v)

    cache = _cache(model, 1, 4)
    with torch.no_grad():
        plain = model.run(Step(positions=torch.arange(4)[None]), input_ids=ids).logits
        hooked = model.run(append_step(cache, 1, 4, kv_hook=hook), input_ids=ids).logits
        same = model.run(Step(positions=torch.arange(4)[None], kv_hook=lambda i, k, v: (k, v)), input_ids=ids).logits
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == (1, 2, 4, 16)
    assert torch.count_nonzero(cache.layer(1)[1]) == 0 and torch.count_nonzero(cache.layer(2)[1]) > 0
    assert torch.equal(same, plain) and not torch.allclose(hooked, plain)


def test_rerotate_moves_keys_to_other_positions_and_bases():
    model = _deep(layers=1)
    ids = torch.tensor([[5, 17, 33, 60]])
    captured = {}

    def keys_at(positions, theta):
        object.__setattr__(model.config, "rope_theta", theta)  # frozen dataclass: a test-only switch
        with torch.no_grad():
            model.run(Step(positions=positions, kv_hook=lambda i, k, v: captured.update(k=k) or (k, v)),
                      input_ids=ids)
        return captured["k"]

    base_theta = model.config.rope_theta
    try:
        at_zero = keys_at(torch.arange(4)[None], base_theta)
        shifted = torch.tensor([[100, 101, 205, 300]])
        torch.testing.assert_close(rerotate(at_zero, torch.arange(4)[None], shifted, base_theta),
                                   keys_at(shifted, base_theta), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rerotate(at_zero, torch.arange(4)[None], shifted, base_theta, 1e6),
                                   keys_at(shifted, 1e6), atol=1e-5, rtol=1e-5)
    finally:
        object.__setattr__(model.config, "rope_theta", base_theta)


def test_causal_step_positions_follow_left_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    step = causal_step((2, 4), mask)
    assert step.positions.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert step.mask.shape == (2, 1, 4, 4) and not step.causal
