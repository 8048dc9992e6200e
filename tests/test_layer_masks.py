"""Per-layer visibility of a received past (PastKV.layer_valid, KVCache.layer_valid, Step.layer_mask) against
cache-free references, and the read-only query hook that attention probes use."""

import math

import pytest
import torch
from torch.nn.attention.bias import CausalBias

from ember.engine import Engine, KVCache, SamplingParams
from ember.engine.past import PastKV, concat_past
from ember.engine.prefill import prefill
from ember.engine.steps import append_step, static_step
from ember.errors import GenerationError, StepError
from ember.models.loader import random_model
from ember.models.presets import preset_config
from ember.models.step import Step, causal_step

LAYERS = 4
CONTEXT = list(range(10, 22))  # the sharer's context: 12 tokens
PROMPT = [40, 41, 42, 43, 44]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def _engine(family="tiny-qwen2", seed=3) -> Engine:
    model = random_model(preset_config(family, num_layers=LAYERS), torch.float32, torch.device("cpu"), seed=seed)
    return Engine(model, None, prefix_cache=False, progress=False)


@pytest.fixture(scope="module")
def engine():
    return _engine()


def _past(engine, context=CONTEXT, layer_valid=None) -> PastKV:
    kv, _ = engine.prefill_kv(context, use_prefix_cache=False)  # (L, 2, H, m, D)
    return PastKV(kv, len(context), layer_valid)


def _subset_mask(tokens: int, layers=(1, 2)) -> torch.Tensor:
    """KVComm-like visibility (L, m): the selected layers see the whole past, the others its first token only."""
    valid = torch.zeros(LAYERS, tokens, dtype=torch.bool)
    valid[:, 0] = True
    valid[list(layers)] = True
    return valid


def _prefill_logits(engine, prompts, pasts) -> torch.Tensor:
    """The engine's next-token logits (P, V) after prefilling prompts over their pasts."""
    with torch.inference_mode():
        _, logits = prefill(engine.model, prompts, 1, 0, 0, engine._fresh_cache, engine.versions, None, pasts)
    return logits


def _reference_masked(model, past: PastKV, tokens: list[int]) -> torch.Tensor:
    """Logits (T, V) of `tokens` after `past` from one cache-free forward: a kv_hook prepends the past K/V of each
    layer, an explicit bool mask shows every past key and is causal over the tokens, a layer_mask hides past keys
    per layer."""
    config, m, steps = model.config, past.tokens, len(tokens)

    def prepend(layer, k, v):  # k, v (1, H, T, D) -> (1, H, m + T, D)
        return torch.cat([past.kv[layer, 0][None], k], 2), torch.cat([past.kv[layer, 1][None], v], 2)

    visible = torch.ones(steps, m + steps, dtype=torch.bool)
    visible[:, m:] = torch.ones(steps, steps, dtype=torch.bool).tril()  # (T, m + T)
    layer_valid = (past.layer_valid if past.layer_valid is not None
                   else torch.ones(config.num_layers, m, dtype=torch.bool))  # (L, m)
    layer_mask = torch.cat([layer_valid, torch.ones(config.num_layers, steps, dtype=torch.bool)], 1)  # (L, m + T)
    step = Step(positions=past.next_position + torch.arange(steps)[None], mask=visible[None, None], causal=False,
                kv_hook=prepend, layer_mask=layer_mask[:, None, None, None, :])
    with torch.no_grad():
        return model.run(step, input_ids=torch.tensor([tokens])).logits[0]


def _reference_dropped(model, past: PastKV, tokens: list[int]) -> torch.Tensor:
    """The same logits (T, V) without any layer mask: layer by layer, each layer's kv_hook prepends only the past
    tokens that layer sees (keys carry their positions, so dropping a key equals masking it)."""
    config, steps = model.config, len(tokens)
    layer_valid = past.layer_valid if past.layer_valid is not None else torch.ones(config.num_layers, past.tokens,
                                                                                     dtype=torch.bool)
    positions = past.next_position + torch.arange(steps)[None]
    hidden = None
    with torch.no_grad():
        for layer in range(config.num_layers):
            kept = past.kv[layer][:, :, layer_valid[layer]]  # (2, H, m_l, D)
            seen = kept.shape[2]
            visible = torch.ones(steps, seen + steps, dtype=torch.bool)
            visible[:, seen:] = torch.ones(steps, steps, dtype=torch.bool).tril()

            def prepend(index, k, v, kept=kept):
                return torch.cat([kept[0][None], k], 2), torch.cat([kept[1][None], v], 2)

            step = Step(positions=positions, mask=visible[None, None], causal=False, kv_hook=prepend,
                        layers=(layer, layer + 1))
            out = model.run(step, input_ids=torch.tensor([tokens]) if layer == 0 else None, hidden=hidden)
            hidden = out.hidden
    return out.logits[0]


def _greedy_reference(reference, model, past, prompt, steps) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs by full recompute of the reference after each drawn token."""
    tokens, logprobs = list(prompt), []
    for _ in range(steps):
        lp = torch.log_softmax(reference(model, past, tokens)[-1].float(), -1)
        token = int(lp.argmax())
        tokens.append(token)
        logprobs.append(float(lp[token]))
    return tokens[len(prompt):], logprobs


def _one(engine, prompt, past, sampling=GREEDY):
    return engine.generate([prompt], sampling=sampling, past=[past]).outputs[0].completions[0]


# ---- equivalences --------------------------------------------------------------------------------------------

def test_all_true_layer_valid_changes_nothing(engine):
    past = _past(engine)
    seen = PastKV(past.kv, past.next_position, torch.ones(LAYERS, past.tokens, dtype=torch.bool))
    plain, masked = _one(engine, PROMPT, past), _one(engine, PROMPT, seen)
    assert masked.token_ids == plain.token_ids and masked.logprobs == plain.logprobs
    assert torch.equal(_prefill_logits(engine, [PROMPT], [seen]), _prefill_logits(engine, [PROMPT], [past]))


def test_token_hidden_in_every_layer_equals_a_past_without_it(engine):
    past = _past(engine)
    for hidden in (3, 0, past.tokens - 1):
        keep = [j for j in range(past.tokens) if j != hidden]
        valid = torch.ones(LAYERS, past.tokens, dtype=torch.bool)
        valid[:, hidden] = False
        masked = PastKV(past.kv, past.next_position, valid)
        without = PastKV(past.kv[:, :, :, keep], past.next_position)  # gaps: next_position unchanged
        torch.testing.assert_close(_prefill_logits(engine, [PROMPT], [masked]),
                                   _prefill_logits(engine, [PROMPT], [without]), atol=1e-5, rtol=1e-5)
        a, b = _one(engine, PROMPT, masked), _one(engine, PROMPT, without)
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-qwen3", "tiny-llama"])
def test_tokens_hidden_in_some_layers_match_cache_free_references(family):
    engine = _engine(family)
    past = _past(engine, layer_valid=_subset_mask(len(CONTEXT)))
    past.layer_valid[2, 5:8] = False  # and a few more holes in a selected layer
    masked = _reference_masked(engine.model, past, PROMPT)
    dropped = _reference_dropped(engine.model, past, PROMPT)
    torch.testing.assert_close(masked, dropped, atol=1e-5, rtol=1e-5)
    got = _prefill_logits(engine, [PROMPT], [past])[0]
    torch.testing.assert_close(got, masked[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _prefill_logits(engine, [PROMPT], [PastKV(past.kv, past.next_position)])[0],
                              atol=1e-3), "the layer mask must change something"
    completion = _one(engine, PROMPT, past)
    tokens, logprobs = _greedy_reference(_reference_masked, engine.model, past, PROMPT, GREEDY.max_tokens)
    assert completion.token_ids == tokens
    torch.testing.assert_close(torch.tensor(completion.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=1e-4)


def test_batched_rows_with_and_without_layer_masks_equal_their_single_runs(engine):
    short = _past(engine, CONTEXT[:7])
    masked = _past(engine, layer_valid=_subset_mask(len(CONTEXT), layers=(0, 3)))
    prompts, pasts = [PROMPT, PROMPT[:2]], [masked, short]
    sampling = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    batched = engine.generate(prompts, n=2, sampling=sampling, past=pasts).outputs
    for prompt, past, out in zip(prompts, pasts, batched):
        alone = _one(engine, prompt, past, sampling)
        for cand in out.completions:  # two greedy candidates share the prefill (cache rows in groups of 2)
            assert cand.token_ids == alone.token_ids
            torch.testing.assert_close(torch.tensor(cand.logprobs), torch.tensor(alone.logprobs), atol=1e-5,
                                       rtol=1e-5)
    torch.testing.assert_close(_prefill_logits(engine, prompts, pasts),
                               torch.cat([_prefill_logits(engine, [p], [q]) for p, q in zip(prompts, pasts)]),
                               atol=1e-5, rtol=1e-5)


def test_static_decode_step_applies_the_layer_mask_as_the_dynamic_step_does(engine):
    """The fixed-shape step (what a CUDA graph would replay) carries the cache's per-layer validity too."""
    model, config = engine.model, engine.model.config
    past = _past(engine, layer_valid=_subset_mask(len(CONTEXT)))
    caches = [KVCache(config, 2, len(CONTEXT) + 8, torch.float32, "cpu") for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            cache.load(slice(0, 1), 0, past.kv, past.next_position, past.layer_valid)
            cache.load(slice(1, 2), 0, past.kv, past.next_position)
            cache.skip_to(len(CONTEXT))
            model.run(append_step(cache, 2, 2), input_ids=torch.tensor([[40, 41], [40, 41]]))
        caches[1].sync_slot()
        for token in (7, 9, 11):
            ids = torch.full((2, 1), token)
            dynamic = model.run(append_step(caches[0], 2, 1), input_ids=ids).logits
            static = model.run(static_step(caches[1]), input_ids=ids).logits
            caches[1].advance_static()
            caches[1].length += 1
            torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dynamic[0], dynamic[1], atol=1e-3), "row 0 hides tokens in layers 0 and 3, row 1 not"


def test_graph_decode_is_not_used_with_layer_valid(engine, monkeypatch):
    """On a GPU the batch whose cache has per-layer validity decodes eagerly; one without replays the graph."""
    import ember.engine.generate as generate

    replays = []

    class FakeGraph:  # stands in for a CUDA graph: the fixed-shape step run eagerly
        def __init__(self, model, cache):
            self.model, self.cache = model, cache

        def step(self, tokens):
            replays.append(int(tokens.shape[0]))
            logits = self.model.run(static_step(self.cache, logits="last"), input_ids=tokens[:, None]).logits[:, -1]
            self.cache.advance_static()
            self.cache.length += 1
            return logits

    fresh = _engine()
    monkeypatch.setattr(generate, "DecodeGraph", FakeGraph)
    monkeypatch.setattr(fresh, "_graphs_on", lambda: True)
    past = _past(fresh)
    plain = _one(fresh, PROMPT, past)
    assert replays, "without layer_valid the graph path is taken"
    replays.clear()
    seen = PastKV(past.kv, past.next_position, _subset_mask(past.tokens))
    masked = _one(fresh, PROMPT, seen)
    assert not replays
    assert masked.token_ids == _one(engine, PROMPT, seen).token_ids
    assert plain.token_ids == _one(engine, PROMPT, past).token_ids
    cache = next(iter(fresh._workspaces.values()))  # one bucket: the same cache served both calls
    assert cache.layer_valid is not None
    assert _one(fresh, PROMPT, past).token_ids == plain.token_ids
    assert replays and cache.layer_valid is None, "the workspace's reset drops the per-layer validity"


def test_concat_past_joins_layer_validity(engine):
    past = _past(engine)
    head = PastKV(past.kv[:, :, :, :4], 4)
    tail = PastKV(past.kv[:, :, :, 4:], past.next_position, _subset_mask(past.tokens - 4))
    joined = concat_past([head, tail])
    assert torch.equal(joined.kv, past.kv) and joined.next_position == past.next_position
    assert torch.equal(joined.layer_valid[:, :4], torch.ones(LAYERS, 4, dtype=torch.bool))
    assert torch.equal(joined.layer_valid[:, 4:], tail.layer_valid)
    assert concat_past([head, PastKV(past.kv[:, :, :, 4:], past.next_position)]).layer_valid is None


# ---- the query hook ------------------------------------------------------------------------------------------

def _probe(q, keys, mask, causal):
    """Attention probabilities (b, H, T, S) from a query hook's arguments."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)  # (b, H, S, D)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (b, H, T, S)
    steps, length = scores.shape[-2:]
    if isinstance(mask, CausalBias):  # lower-right causal: query i sees keys up to length - steps + i
        mask = torch.ones(steps, length, dtype=torch.bool).tril(length - steps)
    elif mask is None and causal:
        mask = torch.ones(steps, length, dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1)


def _record(model):
    """A query hook recording its calls and forward hooks capturing each layer's attention output (o_proj input)."""
    calls, outputs = [], {}

    def hook(layer, q, keys, mask):
        calls.append((layer, q.clone(), keys.clone(), mask))

    handles = [layer.self_attn.o_proj.register_forward_hook(
        lambda module, args, out, i=i: outputs.__setitem__(i, args[0].clone()))
        for i, layer in enumerate(model.model.layers)]
    return hook, calls, outputs, handles


def _check_probes(model, calls, outputs, values, causal):
    config = model.config
    assert [c[0] for c in calls] == list(range(config.num_layers))
    for layer, q, keys, mask in calls:
        rows, steps = outputs[layer].shape[:2]
        assert q.shape == (rows, config.num_heads, steps, config.head_dim)
        assert keys.shape[:2] == (rows, config.num_kv_heads) and keys.shape[3] == config.head_dim
        probs = _probe(q, keys, mask, causal)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=1e-5)
        v = values[layer].repeat_interleave(config.num_heads // config.num_kv_heads, dim=1)  # (b, H, S, D)
        attended = (probs @ v).transpose(1, 2).reshape(rows, steps, -1)  # (b, T, H * D)
        torch.testing.assert_close(attended, outputs[layer], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-qwen3"])
def test_query_hook_on_a_cache_free_causal_step(family):
    model = _engine(family).model
    hook, calls, outputs, handles = _record(model)
    values = {}

    def keep_values(layer, k, v):
        values[layer] = v
        return k, v

    with torch.no_grad():
        model.run(causal_step((2, 6), kv_hook=keep_values, query_hook=hook), input_ids=torch.arange(30, 42).view(2, 6))
    for handle in handles:
        handle.remove()
    assert all(mask is None for *_, mask in calls)
    assert all(keys.shape[2] == 6 for _, _, keys, _ in calls)
    _check_probes(model, calls, outputs, values, causal=True)


def test_query_hook_sees_the_layer_masked_cache(engine):
    model, config = engine.model, engine.model.config
    past = _past(engine, layer_valid=_subset_mask(len(CONTEXT)))
    cache = KVCache(config, 1, len(CONTEXT) + 8, torch.float32, "cpu")
    cache.load(slice(0, 1), 0, past.kv, past.next_position, past.layer_valid)
    cache.skip_to(len(CONTEXT))
    hook, calls, outputs, handles = _record(model)
    with torch.inference_mode():
        model.run(append_step(cache, 1, len(PROMPT), query_hook=hook), input_ids=torch.tensor([PROMPT]))
        end = cache.length
        values = {layer: cache.layer(layer)[1][:, :, :end] for layer in range(config.num_layers)}
        _check_probes(model, calls, outputs, values, causal=False)
        for layer, q, keys, mask in calls:
            assert keys.shape[2] == end and mask.dtype == torch.bool and mask.shape == (1, 1, len(PROMPT), end)
            probs = _probe(q, keys, mask, causal=False)[0]  # (H, T, S)
            hidden = ~past.layer_valid[layer]  # (m,)
            assert bool(hidden.any()) == (layer not in (1, 2))
            assert not probs[:, :, :len(CONTEXT)][:, :, hidden].any()
            assert probs[:, :, :len(CONTEXT)][:, :, ~hidden].min() > 0
        calls.clear()
        model.run(append_step(cache, 1, 1, query_hook=hook), input_ids=torch.tensor([[7]]))  # one decode query
        assert [c[0] for c in calls] == list(range(config.num_layers))
        assert all(keys.shape[2] == end + 1 and mask.shape == (1, 1, 1, end + 1) for _, _, keys, mask in calls)
    for handle in handles:
        handle.remove()


def test_query_hook_gets_the_lower_right_causal_bias_after_a_cached_prefix(engine):
    model, config = engine.model, engine.model.config
    cache = KVCache(config, 1, 16, torch.float32, "cpu")
    hook, calls, outputs, handles = _record(model)
    with torch.inference_mode():
        model.run(append_step(cache, 1, 5), input_ids=torch.tensor([[30, 31, 32, 33, 34]]))
        model.run(append_step(cache, 1, 3, query_hook=hook), input_ids=torch.tensor([[35, 36, 37]]))
        values = {layer: cache.layer(layer)[1][:, :, :8] for layer in range(config.num_layers)}
        assert all(isinstance(mask, CausalBias) for *_, mask in calls)
        _check_probes(model, calls, outputs, values, causal=False)
    for handle in handles:
        handle.remove()


# ---- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda m: torch.ones(LAYERS - 1, m, dtype=torch.bool), r"expected layer_valid of shape \(L, m\) = \(4, 12\), "
                                                            r"found \(3, 12\)"),
    (lambda m: torch.ones(LAYERS, m + 1, dtype=torch.bool), r"= \(4, 12\), found \(4, 13\)"),
    (lambda m: torch.ones(LAYERS, m, 1, dtype=torch.bool), r"= \(4, 12\), found \(4, 12, 1\)"),
    (lambda m: torch.ones(LAYERS, m), r"expected layer_valid as a torch.bool tensor, found torch.float32"),
    (lambda m: torch.ones(LAYERS, m, dtype=torch.long), r"torch.bool tensor, found torch.int64"),
    (lambda m: [[True] * m] * LAYERS, r"torch.bool tensor, found list"),
])
def test_bad_layer_valid_is_refused(engine, make, message):
    past = _past(engine)
    with pytest.raises(GenerationError, match=r"past 0: .*" + message):
        engine.generate([PROMPT], sampling=GREEDY, past=[PastKV(past.kv, past.next_position, make(past.tokens))])


def test_layer_mask_needs_a_bool_mask():
    positions = torch.arange(3)[None]
    layer_mask = torch.ones(LAYERS, 1, 1, 1, 3, dtype=torch.bool)
    with pytest.raises(StepError, match="needs `mask` as a bool tensor .* found NoneType"):
        Step(positions=positions, layer_mask=layer_mask)
    with pytest.raises(StepError, match="found a torch.float32 tensor"):
        Step(positions=positions, mask=torch.zeros(1, 1, 3, 3), causal=False, layer_mask=layer_mask)
    with pytest.raises(StepError, match=r"expected a bool tensor \(L, b, 1, 1, S\), found torch.float32"):
        Step(positions=positions, mask=torch.ones(1, 1, 3, 3, dtype=torch.bool), layer_mask=layer_mask.float())
