"""The RL trainers and loop: each loss against a per-token reference, rollout log-probs against a recompute
with the differentiable forward, the hot swap (no base weight copied), checkpoints that resume exactly, and the
prefix cache's state round trip."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from ember.engine import Engine, SamplingParams
from ember.engine.prefix_cache import PrefixCache
from ember.errors import TrainError
from ember.models import load
from ember.models.versions import model_fingerprint
from ember.policies import PolicyRunner, make_policy
from ember.train import BestOfNTrainer, DPOTrainer, Example, GRPOTrainer, TrainConfig, make_trainer
from ember.train.best_of_n import best_candidates
from ember.train.dpo import preference_pairs
from ember.train.losses import dpo_loss, group_advantages, grpo_loss
from ember.train.loop import LoopConfig, run_loop
from ember.train.rollouts import Candidate, Group, groups_from
from ember.train.tokens import token_logprobs

TOL = 1e-5


@dataclass(frozen=True)
class LetterTask:
    """A toy verifier task for a random model: the reward is the share of a letter in the completion."""

    prompts: tuple
    examples: tuple
    letter: str = "e"

    def score(self, index: int, text: str) -> float:
        return text.count(self.letter) / max(len(text), 1)


def _task(tokenizer, count=2):
    prompts = tuple(f"Shared instructions shared instructions shared. Item {i}: write" for i in range(count))
    examples = tuple(Example.from_text(tokenizer, p, " eee") for p in prompts)
    return LetterTask(prompts, examples)


def _rollout_groups(engine, task, n=3, temperature=1.0, max_tokens=6, seed=0):
    result = engine.generate(list(task.prompts), n, SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                                                   seed=seed))
    rewards = [[task.score(i, c.text) for c in out.completions] for i, out in enumerate(result.outputs)]
    return result, groups_from(result, rewards, list(task.examples))


def _token_logprob(model, prompt, answer, offset):
    """Per token, unpadded, in float64: log p(answer[offset] | prompt + answer[:offset])."""
    ids = torch.tensor([list(prompt) + list(answer)])
    logits = model(ids)[0]  # (T, V)
    position = len(prompt) + offset
    return F.log_softmax(logits[position - 1].double(), dim=-1)[ids[0, position]].item()


# ---- the losses' math against per-token loops ---------------------------------------------------------------

def test_group_advantages_match_a_direct_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    adv = group_advantages(rewards)
    for g, row in enumerate(rewards.tolist()):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row))
        for j, r in enumerate(row):
            assert adv[g, j].item() == pytest.approx((r - mean) / (std + 1e-6), abs=TOL)
    assert torch.all(adv[1] == 0)


@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
def test_grpo_loss_matches_a_per_token_loop(kl_beta):
    gen = torch.Generator().manual_seed(0)
    b, t, eps = 3, 5, 0.2
    new, old, ref = (torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.3 - 2 for _ in range(3))
    adv = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)
    lengths = [5, 2, 4]
    mask = torch.tensor([[1.0 if j < n else 0.0 for j in range(t)] for n in lengths], dtype=torch.float64)
    loss, _ = grpo_loss(new, old, adv, mask, eps, ref, kl_beta)
    for i in range(b):
        total = 0.0
        for j in range(lengths[i]):
            rho = math.exp(new[i, j].item() - old[i, j].item())
            clipped = min(max(rho, 1 - eps), 1 + eps)
            term = -min(rho * adv[i].item(), clipped * adv[i].item())
            d = ref[i, j].item() - new[i, j].item()
            total += term + kl_beta * (math.exp(d) - d - 1)
        assert loss[i].item() == pytest.approx(total / lengths[i], abs=TOL)


def test_dpo_loss_matches_the_formula_pair_by_pair():
    values = torch.tensor([[-3.0, -5.0, -3.5, -4.0], [-2.0, -1.0, -2.5, -1.5]], dtype=torch.float64)
    loss = dpo_loss(values[:, 0], values[:, 1], values[:, 2], values[:, 3], beta=0.5)
    for i, (c, r, rc, rr) in enumerate(values.tolist()):
        margin = 0.5 * ((c - rc) - (r - rr))
        assert loss[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-margin))), abs=TOL)


# ---- the trainers on a tiny model against slow references ------------------------------------------------------

@pytest.fixture
def tiny():
    loaded = load("tiny-qwen3")
    engine = Engine(loaded.model, loaded.tokenizer, progress=False, cuda_graphs=False, prefix_cache=False)
    return loaded.model, engine, _task(loaded.tokenizer)


def test_rollout_logprobs_equal_a_recompute_with_the_differentiable_forward(tiny):
    model, engine, task = tiny
    result, groups = _rollout_groups(engine, task)
    examples = [g.example(c) for g in groups for c in g.candidates]
    chosen, weight = token_logprobs(model, examples)
    rollout = [lp for g in groups for c in g.candidates for lp in c.logprobs]
    recomputed = chosen[weight.bool()].tolist()  # row-major: each example's answer tokens in order
    assert len(recomputed) == len(rollout)
    assert max(abs(a - b) for a, b in zip(recomputed, rollout)) < 1e-4


def test_grpo_trainer_loss_equals_a_per_token_reference(tiny):
    model, engine, task = tiny
    _, groups = _rollout_groups(engine, task)
    config = TrainConfig(rank=4, alpha=8, lr=1e-2, micro_batch=2, kl_beta=0.05)
    trainer = GRPOTrainer(model, config)
    with torch.no_grad():  # the adapter's B starts at zero: give it a value so policy and reference differ
        for _, b in trainer.adapter.weights.values():
            b.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    expected, count = 0.0, 0
    for group in groups:
        rewards = group.rewards
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        for cand in group.candidates:
            adv = (cand.reward - mean) / (std + 1e-6)
            with torch.no_grad():
                with_adapter = _with(model, trainer.adapter)
                new = [with_adapter(group.prompt, cand.tokens, j) for j in range(len(cand.tokens))]
                ref = [_token_logprob(model, group.prompt, cand.tokens, j) for j in range(len(cand.tokens))]
            terms = []
            for j, old in enumerate(cand.logprobs):
                rho = math.exp(new[j] - old)
                term = -min(rho * adv, min(max(rho, 0.8), 1.2) * adv)
                d = ref[j] - new[j]
                terms.append(term + 0.05 * (math.exp(d) - d - 1))
            expected += sum(terms) / len(terms)
            count += 1
    metrics = trainer.train(groups)
    assert metrics["loss"] == pytest.approx(expected / count, abs=TOL)
    assert metrics["sequences"] == count


def _with(model, adapter):
    """A per-token log-prob function with `adapter` attached."""
    from ember.models.lora import attach, kept_bindings, lora_modules

    def logprob(prompt, answer, offset):
        with kept_bindings(lora_modules(model).values()):
            attach(model, adapter)
            return _token_logprob(model, prompt, answer, offset)

    return logprob


def _groups_with_spread():
    """Two prompts' candidates with distinct rewards (tokens of the tiny char vocabulary)."""
    def cand(tokens, reward):
        return Candidate(tuple(tokens), tuple(-1.0 for _ in tokens), reward)

    gold = Example([5, 6], [7])
    return [Group((10, 11, 12), (cand([20, 21], 0.2), cand([22], 0.9), cand([23, 24, 25], 0.1)), gold),
            Group((13, 14), (cand([26], 0.5), cand([27, 28], 0.5), cand([29], 0.5)), gold)]


def test_dpo_trainer_loss_equals_a_per_pair_reference():
    model = load("tiny-qwen3").model
    groups = _groups_with_spread()
    pairs = preference_pairs(groups)
    assert [(p[0].answer, p[1].answer) for p in pairs] == [([22], [23, 24, 25])]  # equal rewards make no pair
    trainer = DPOTrainer(model, TrainConfig(rank=4, alpha=8, dpo_beta=0.3))
    with torch.no_grad():
        for _, b in trainer.adapter.weights.values():
            b.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
        policy = _with(model, trainer.adapter)
        seq = {}
        for name, ex in (("chosen", pairs[0][0]), ("rejected", pairs[0][1])):
            seq[name] = sum(policy(ex.prompt, ex.answer, j) for j in range(len(ex.answer)))
            seq["ref_" + name] = sum(_token_logprob(model, ex.prompt, ex.answer, j) for j in range(len(ex.answer)))
    margin = 0.3 * ((seq["chosen"] - seq["ref_chosen"]) - (seq["rejected"] - seq["ref_rejected"]))
    metrics = trainer.train(groups)
    assert metrics["loss"] == pytest.approx(math.log1p(math.exp(-margin)), abs=TOL)
    assert metrics["pairs"] == 1


def test_best_of_n_trains_on_the_best_candidate_with_the_sft_loss():
    model = load("tiny-qwen3").model
    groups = _groups_with_spread()
    chosen = best_candidates(groups, min_reward=0.0)
    assert [e.answer for e in chosen] == [[22], [26]]  # ties: the first highest
    assert best_candidates(groups, min_reward=0.95) == []
    trainer = BestOfNTrainer(model, TrainConfig(rank=4, alpha=8))
    with torch.no_grad():
        expected = -sum(_token_logprob(model, e.prompt, e.answer, j) for e in chosen for j in range(len(e.answer)))
    metrics = trainer.train(groups)
    assert metrics["loss"] == pytest.approx(expected / sum(len(e.answer) for e in chosen), abs=TOL)
    assert BestOfNTrainer(model, TrainConfig(rank=4, min_reward=0.95)).train(groups)["skipped"]


def test_trainers_touch_only_the_adapter_and_the_swap_copies_no_base_weight(tiny):
    model, _, task = tiny
    before = model_fingerprint(model)
    pointers = [p.data_ptr() for p in model.parameters()]
    engine = Engine(model, load("tiny-qwen3").tokenizer, progress=False, cuda_graphs=False)
    runner = PolicyRunner(engine, make_policy("keep_stale"))
    for name in ("sft", "best_of_n", "dpo", "grpo"):
        trainer = make_trainer(name, model, TrainConfig(rank=4, alpha=8, lr=5e-2, kl_beta=0.05))
        _, groups = _rollout_groups(engine, task)
        trainer.train(groups)
        runner.update(trainer.adapter)
        active = engine.adapter(engine.active_adapter)
        for module, (a, b) in trainer.adapter.weights.items():
            assert torch.equal(active.weights[module][1], b.detach())
    assert model_fingerprint(model) == before and [p.data_ptr() for p in model.parameters()] == pointers


def test_equal_rewards_give_exact_zero_advantages_and_no_step():
    rewards = torch.tensor([[0.7, 0.7, 0.7], [1 / 7, 1 / 7, 1 / 7]], dtype=torch.float64)
    assert torch.equal(group_advantages(rewards), torch.zeros_like(rewards))
    model = load("tiny-qwen3").model
    gold = Example([5, 6], [7])
    group = Group((10, 11), tuple(Candidate((20 + j,), (-1.0,), 0.7) for j in range(3)), gold)
    assert GRPOTrainer(model, TrainConfig(rank=2)).train([group])["skipped"]


def test_a_non_finite_gradient_takes_no_step():
    model = load("tiny-qwen3").model
    trainer = GRPOTrainer(model, TrainConfig(rank=2))
    before = [t.detach().clone() for t in trainer.adapter.parameters()]
    with pytest.raises(TrainError, match="finite gradients"):
        # a finite loss (0) whose gradient is not: d sqrt(|x|) / dx at x = 0
        trainer.optimize([0], lambda _: torch.sqrt((trainer.adapter.parameters()[0] -
                                                    trainer.adapter.parameters()[0].detach()).abs()).sum())
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, trainer.adapter.parameters()))


def test_unknown_trainer_and_bad_candidates_are_clear_errors():
    with pytest.raises(TrainError, match="expected one of"):
        make_trainer("ppo", load("tiny-qwen3").model, TrainConfig())
    with pytest.raises(TrainError, match="one log-prob per token"):
        Candidate((1, 2), (-0.5,), 1.0)
    for bad in ({"micro_batch": 0}, {"steps_per_round": 0}, {"clip_eps": -0.1}, {"lr": -1.0}):
        with pytest.raises(TrainError, match=f"TrainConfig.{next(iter(bad))}: expected"):
            TrainConfig(**bad)
    gold = Example([5], [6])
    ragged = [Group((1,), (Candidate((2,), (-1.0,), 0.0), Candidate((3,), (-1.0,), 1.0)), gold),
              Group((1,), (Candidate((2,), (-1.0,), 0.0),), gold)]
    with pytest.raises(TrainError, match="same number of candidates"):
        GRPOTrainer(load("tiny-qwen3").model, TrainConfig(rank=2)).train(ragged)


# ---- the loop: checkpoints and exact resume ---------------------------------------------------------------

def _run(folder, rounds, stop_after=None, policy="keep_stale"):
    loaded = load("tiny-qwen3")
    engine = Engine(loaded.model, loaded.tokenizer, progress=False, cuda_graphs=False)
    runner = PolicyRunner(engine, make_policy(policy), block_size=4)
    trainer = make_trainer("grpo", loaded.model, TrainConfig(rank=4, alpha=8, lr=1e-3, micro_batch=3, kl_beta=0.05))
    done = []
    stop = (lambda: len(done) >= stop_after) if stop_after else None
    config = LoopConfig(rounds=rounds, candidates=3, max_tokens=5, probe_prompts=1)
    original = runner.generate

    def counted(*args, **kwargs):
        done.append(1)
        return original(*args, **kwargs)

    runner.generate = counted
    rows, finished = run_loop(runner, trainer, _task(loaded.tokenizer), config, folder, stop)
    return rows, finished, trainer.adapter


TIMING = {"prefill_s", "decode_s", "sampling_s", "refresh_s", "train_s", "swap_s", "rollout_s", "peak_memory_bytes",
          "rss_peak_bytes"}


def _untimed(rows):
    """Rows without timing columns, NaN spelled out so that equal runs compare equal."""
    return [{k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items() if k not in TIMING}
            for row in rows]


def test_a_run_stopped_after_round_two_resumes_to_the_uninterrupted_result(tmp_path):
    full, finished, adapter = _run(tmp_path / "full", rounds=4)
    assert finished and len(full) == 4
    assert all(row["train_sequences"] > 0 for row in full)  # every round trained
    assert full[-1]["k_rel_l2"] > full[0]["k_rel_l2"] > 0  # KeepStale really served ever staler K/V
    first, finished, _ = _run(tmp_path / "split", rounds=4, stop_after=2)
    assert not finished and len(first) == 2
    resumed, finished, resumed_adapter = _run(tmp_path / "split", rounds=4)
    assert finished and _untimed(resumed) == _untimed(full)
    for name, (a, b) in adapter.weights.items():
        assert torch.equal(resumed_adapter.weights[name][0], a) and torch.equal(resumed_adapter.weights[name][1], b)
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["LATEST", "round-0003"]


def test_a_checkpoint_of_another_run_is_refused_and_left_intact(tmp_path):
    _run(tmp_path, rounds=1)
    with pytest.raises(TrainError, match="made by another run"):
        _run(tmp_path, rounds=1, policy="prefix_only")
    assert (tmp_path / "round-0000" / "adapter").is_dir()


def test_prefix_cache_state_round_trips_with_its_lru_order():
    loaded = load("tiny-qwen3")
    engine = Engine(loaded.model, loaded.tokenizer, progress=False, cuda_graphs=False,
                    prefix_cache=PrefixCache(block_size=4))
    base = "A shared head of a prompt. "
    engine.generate([base + "one", base + "two"], sampling=SamplingParams(temperature=0, max_tokens=2))
    engine.generate([base + "one"], sampling=SamplingParams(temperature=0, max_tokens=2))  # parent after a child
    cache = engine.prefix_cache
    copy = PrefixCache.from_state(cache.state())
    original = [(b.tokens, b.versions, b.parent is None) for b in cache._blocks.values()]
    assert [(b.tokens, b.versions, b.parent is None) for b in copy._blocks.values()] == original
    assert copy.bytes_held == cache.bytes_held and copy.stats == cache.stats
    versions = engine.versions
    for prompt in (base + "one", base + "two"):
        ids = loaded.tokenizer.encode(prompt)
        assert copy.cached_tokens(ids, versions) == cache.cached_tokens(ids, versions) > 0
        a, b = copy.match(ids, versions), cache.match(ids, versions)
        assert torch.equal(PrefixCache.gather(a), PrefixCache.gather(b))
        copy.release(a)
        cache.release(b)
