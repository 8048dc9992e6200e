"""Cache policies across real LoRA updates (SFT steps): each policy's reuse against a fresh recompute with the
current adapter, what each one pays, the low-rank correction, and errors for decisions that cannot be applied."""

import pytest
import torch

from ember.engine import Engine, SamplingParams
from ember.engine.refresh import lora_delta
from ember.errors import PolicyError
from ember.models import load
from ember.models.loader import random_model
from ember.models.presets import preset_config
from ember.policies import (
    CORRECT,
    KeepStale,
    Naive,
    PeriodicRefresh,
    PolicyRunner,
    PrefixOnly,
    UpdatableKV,
    UpdateLocality,
    make_policy,
)
from ember.policies.base import CachePolicy, Decision
from ember.policies.probes import ProbeSpec, fresh_reference, probe
from ember.train import Example, TrainConfig, SFTTrainer

LAYERS = 6
SHARED = "System: extract the fields name, age and city as one JSON object. "
PROMPTS = [SHARED + "Doc: Alice is 31 and lives in Oslo.", SHARED + "Doc: Bob is 45 and lives in Lima.",
           SHARED + "Doc: Carol is 27."]
ANSWERS = ['{"name": "Alice", "age": 31}', '{"name": "Bob", "age": 45}', '{"name": "Carol", "age": 27}']
SPEC = ProbeSpec(greedy_tokens=8)


def _engine(family="tiny-llama", seed=0, device="cpu"):
    model = random_model(preset_config(family, num_layers=LAYERS), torch.float32, torch.device(device), seed)
    return Engine(model, load(family).tokenizer, progress=False)


def _trainer(engine, layers=None, rank=4, lr=5e-2, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")):
    config = TrainConfig(rank=rank, alpha=2 * rank, targets=targets, layers=layers, lr=lr)
    return SFTTrainer(engine.model, config, pad_id=0)


def _examples(tokenizer):
    return [Example.from_text(tokenizer, p, a) for p, a in zip(PROMPTS, ANSWERS)]


def _round(runner):
    return runner.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))


def _replay(engine, policy, trainer, updates=2):
    """Round 0 fills the cache under the base weights; each update is one real SFT step, hot-swapped."""
    runner = PolicyRunner(engine, policy, block_size=8)
    _round(runner)
    examples = _examples(engine.tokenizer)
    for _ in range(updates):
        trainer.step(examples)
        runner.update(trainer.adapter)
    return runner


def _errors(engine):
    reference = fresh_reference(engine, PROMPTS, SPEC)
    return probe(engine, PROMPTS, reference, SPEC)


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("frozen", [2, 4])
def test_update_locality_equals_full_recompute_after_real_updates(family, frozen):
    engine = _engine(family)
    runner = _replay(engine, UpdateLocality(frozen), _trainer(engine, layers=tuple(range(frozen, LAYERS))))
    errors = _errors(engine)
    assert max(errors["k_rel_l2"] + errors["v_rel_l2"]) < 1e-5
    assert abs(errors["kl"]) < 1e-6 and errors["greedy_agreement"] == 1.0
    stats = runner.stats
    cached = len(runner.prefix_cache.blocks(engine.versions.model)) * 8
    # two updates, each recomputing layers [N, L) of every cached token once
    round0 = stats.tokens_layers_recomputed - 2 * cached * (LAYERS - frozen)
    assert 0 < round0 <= sum(len(engine.tokenizer.encode(p)) for p in PROMPTS) * LAYERS
    assert stats.refresh_s > 0 and stats.updates == 2 and stats.flushes == 0 and stats.tokens_layers_stale == 0


def test_update_locality_matches_generation_without_cache():
    engine = _engine()
    runner = _replay(engine, UpdateLocality(3), _trainer(engine, layers=(3, 4, 5)))
    cached = _round(runner)
    fresh = engine.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                            use_prefix_cache=False)
    assert cached.extra["prefix_cache"]["tokens_reused"] > 0
    for a, b in zip(cached.outputs, fresh.outputs):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        assert a.completions[0].logprobs == pytest.approx(b.completions[0].logprobs, abs=1e-5)


def test_update_locality_refuses_an_adapter_below_its_frozen_depth():
    engine = _engine()
    with pytest.raises(PolicyError, match="changed layer 1 < N"):
        _replay(engine, UpdateLocality(3), _trainer(engine, layers=(1, 2, 3, 4, 5)), updates=1)


def test_keep_stale_reuses_stale_kv_and_its_error_is_measured():
    engine = _engine()
    runner = _replay(engine, KeepStale(), _trainer(engine, layers=(2, 3, 4, 5)))
    errors = _errors(engine)
    assert max(errors["k_rel_l2"][:2] + errors["v_rel_l2"][:2]) < 1e-6  # below the adapter: still valid
    assert min(errors["v_rel_l2"][2:]) > 1e-4 and errors["kl"] > 0  # adapted layers: stale
    assert runner.stats.tokens_layers_stale > 0 and runner.stats.flushes == 0


def test_prefix_only_flushes_and_periodic_refresh_flushes_every_k():
    engine = _engine()
    runner = _replay(engine, PrefixOnly(), _trainer(engine), updates=1)
    assert len(runner.prefix_cache) == 0 and runner.stats.flushes == 1
    assert max(_errors(engine)["k_rel_l2"]) < 1e-5
    engine = _engine()
    trainer = _trainer(engine)
    runner = _replay(engine, PeriodicRefresh(2), trainer, updates=1)
    assert runner.stats.flushes == 0 and max(_errors(engine)["v_rel_l2"]) > 1e-4
    trainer.step(_examples(engine.tokenizer))
    runner.update(trainer.adapter)
    assert runner.stats.flushes == 1 and max(_errors(engine)["v_rel_l2"]) < 1e-5


def test_naive_caches_nothing_and_pays_every_prompt_token_every_round():
    engine = _engine()
    runner = _replay(engine, Naive(), _trainer(engine), updates=1)
    _round(runner)
    assert runner.prefix_cache is None and runner.stats.bytes_held == 0
    tokens = sum(len(engine.tokenizer.encode(p)) for p in PROMPTS)
    assert runner.stats.tokens_layers_recomputed == 2 * tokens * LAYERS and runner.stats.hits == 0


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def test_updatable_kv_is_exact_at_the_first_adapted_layer(family):
    engine = _engine(family)
    adapted = (2, 3, 4, 5)
    runner = _replay(engine, UpdatableKV(10), _trainer(engine, layers=adapted), updates=2)
    corrected = _errors(engine)
    assert corrected["k_rel_l2"][2] < 1e-5 and corrected["v_rel_l2"][2] < 1e-5
    assert max(corrected["k_rel_l2"][:2]) < 1e-6
    assert runner.stats.tokens_layers_corrected > 0 and runner.last_update["layers_corrected"] == len(adapted)
    stale_engine = _engine(family)
    _replay(stale_engine, KeepStale(), _trainer(stale_engine, layers=adapted), updates=2)
    stale = _errors(stale_engine)
    assert stale["v_rel_l2"][2] > 100 * max(corrected["v_rel_l2"][2], 1e-7)  # the correction did something
    assert corrected["v_rel_l2"][3] > 0  # deeper: stale inputs, measured not assumed


def test_updatable_kv_flushes_every_k_and_only_corrects_changed_kv_layers():
    engine = _engine()
    trainer = _trainer(engine, layers=(1, 2), targets=("k_proj", "up_proj"))
    runner = _replay(engine, UpdatableKV(3), trainer, updates=2)
    assert runner.last_update["decision"] == ".CC..." and runner.stats.flushes == 0
    trainer.step(_examples(engine.tokenizer))
    runner.update(trainer.adapter)
    assert runner.stats.flushes == 1 and len(runner.prefix_cache) == 0


def test_lora_delta_is_the_difference_of_the_two_low_rank_terms():
    engine = _engine()
    trainer = _trainer(engine)
    trainer.step(_examples(engine.tokenizer))
    old = trainer.adapter.to()
    trainer.step(_examples(engine.tokenizer))
    new = trainer.adapter.to()
    name = "model.layers.3.self_attn.v_proj"
    a, b = lora_delta(old, new, name)
    dense = lambda ad: ad.scales[name] * ad.weights[name][1] @ ad.weights[name][0]  # noqa: E731
    assert torch.allclose(b @ a, dense(new) - dense(old), atol=1e-6)
    assert lora_delta(new, new, name) is None and lora_delta(None, None, name) is None


def test_bad_policies_and_decisions_are_clear_errors():
    with pytest.raises(PolicyError, match="refresh period k"):
        PeriodicRefresh(0)
    with pytest.raises(PolicyError, match="frozen depth N"):
        UpdateLocality(-1)
    with pytest.raises(PolicyError, match="expected one of"):
        make_policy("lru")
    with pytest.raises(PolicyError, match="update_locality:<int>"):
        make_policy("update_locality")
    assert make_policy("updatable_kv:5").k == 5 and isinstance(make_policy("keep_stale"), KeepStale)

    class Holey(CachePolicy):
        def decide(self, update):
            return Decision((CORRECT,) * 2 + ("recompute",) + ("reuse",) * (update.num_layers - 3))

    engine = _engine()
    with pytest.raises(PolicyError, match="suffix"):
        _replay(engine, Holey(), _trainer(engine), updates=1)
    with pytest.raises(PolicyError, match="expected a CachePolicy"):
        PolicyRunner(engine, "keep_stale")


def test_probe_of_a_fresh_cache_is_zero_and_rewards_use_the_scorer():
    engine = _engine()
    runner = PolicyRunner(engine, KeepStale(), block_size=8)
    _round(runner)
    spec = ProbeSpec(greedy_tokens=6, samples=2, max_tokens=6)
    score = lambda i, text: float(len(text) % 2)  # noqa: E731
    reference = fresh_reference(engine, PROMPTS, spec, score)
    result = probe(engine, PROMPTS, reference, spec, score)
    assert max(result["k_rel_l2"] + result["v_rel_l2"]) < 1e-6 and result["greedy_agreement"] == 1.0
    assert result["reward"] == pytest.approx(reference.reward)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen3"])
def test_policies_on_cuda_against_a_fresh_recompute(family):
    engine = _engine(family, device="cuda")
    _replay(engine, UpdateLocality(3), _trainer(engine, layers=(3, 4, 5)))
    errors = _errors(engine)
    assert max(errors["k_rel_l2"] + errors["v_rel_l2"]) < 1e-5 and errors["greedy_agreement"] == 1.0
    engine = _engine(family, device="cuda")
    _replay(engine, UpdatableKV(10), _trainer(engine, layers=(2, 3, 4, 5)))
    errors = _errors(engine)
    assert errors["k_rel_l2"][2] < 1e-5 and errors["v_rel_l2"][2] < 1e-5 and errors["v_rel_l2"][4] > 0


def test_update_locality_is_exact_on_a_branching_prefix_tree_with_short_prompts_and_evictions():
    """Chains of different reused depths in one recompute wave, a prompt shorter than a block, and blocks
    evicted between updates (a small byte budget): still equal to a fresh recompute."""
    engine = _engine()
    base = SHARED + "Branch X holds a longer note. "
    prompts = [base + "Leaf one: Dana is 52.", base + "Leaf two: Eli is 33.", SHARED + "Y: Finn.", "Hi."]
    runner = PolicyRunner(engine, UpdateLocality(2), block_size=8, max_bytes=200_000)
    sampling = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    runner.generate(prompts, 1, sampling)
    assert runner.prefix_cache.stats.evictions > 0
    trainer = _trainer(engine, layers=(2, 3, 4, 5))
    for _ in range(2):
        trainer.step(_examples(engine.tokenizer))
        runner.update(trainer.adapter)
        reference = fresh_reference(engine, prompts, SPEC)
        errors = probe(engine, prompts, reference, SPEC)
        assert max(errors["k_rel_l2"] + errors["v_rel_l2"]) < 1e-5 and errors["greedy_agreement"] == 1.0
        runner.generate(prompts, 1, sampling)


def test_a_recompute_from_stale_inputs_is_refused():
    class LateRecompute(CachePolicy):
        def decide(self, update):
            return Decision(("reuse",) * 4 + ("recompute",) * (update.num_layers - 4))

    engine = _engine()
    with pytest.raises(PolicyError, match="exact only below layer 2"):
        _replay(engine, LateRecompute(), _trainer(engine, layers=(2, 3, 4, 5)), updates=1)
