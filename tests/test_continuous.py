"""Continuous batching: a prompt group that is done leaves the batch and a waiting request takes its rows.
Every candidate gets the tokens a static batch gives it (per-row draw steps), with fewer rows decoded."""

import functools

import pytest
import torch

from ember.engine import Engine, SamplingParams
from ember.engine.prefill import prefill
from ember.engine.regroup import regroup
from ember.engine.shared_cache import make_cache
from ember.engine.steps import append_step
from ember.errors import GenerationError
from ember.models import load
from ember.models.versions import LayerVersions

PROMPTS = ["Alice has code 4821.", "Hi", "Bob keeps a red box and a blue one in the shed.", "Why?", "Count: 1 2 3",
           "A fifth prompt, longer than most of the others here.", "Seven", "Eight items"]


def _long_tail(n_prompts: int) -> list[SamplingParams]:
    """Seeded sampling with max_tokens from 2 to 30, a min_tokens and stop tokens that end some rows early."""
    lengths = [2, 30, 5, 24, 3, 17, 9, 28]
    return [SamplingParams(temperature=0.9, top_k=20, max_tokens=lengths[i % 8], seed=100 + i, logprobs=1,
                           min_tokens=1 if i % 3 == 0 else 0, stop_token_ids=(5, 9) if i % 2 else ())
            for i in range(n_prompts)]


def _completions(result):
    return [(c.token_ids, c.text, c.finish_reason, [list(top) for top in c.top_logprobs])
            for out in result.outputs for c in out.completions]


class RowCounter:
    """Counts the rows every decode step runs (model.run calls of one new token per row)."""

    def __init__(self, model):
        self.model, self.rows = model, 0
        self.run = model.run

    def __call__(self, step, **kwargs):
        out = self.run(step, **kwargs)
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == 1:
            self.rows += kwargs["input_ids"].shape[0]
        return out


@pytest.mark.parametrize("family, share", [("tiny-qwen2", False), ("tiny-llama", False), ("tiny-qwen3", True)])
def test_continuous_batching_gives_every_candidate_its_static_batch_tokens_with_fewer_rows(family, share,
                                                                                           monkeypatch):
    loaded = load(family)
    sampling = _long_tail(len(PROMPTS))
    engines = {mode: Engine(loaded.model, loaded.tokenizer, max_batch_size=6, prefix_cache=False,
                            share_prompt_kv=share, continuous_batching=mode) for mode in (False, True)}
    results, rows = {}, {}
    for mode, engine in engines.items():
        counter = RowCounter(loaded.model)
        monkeypatch.setattr(loaded.model, "run", counter)
        results[mode] = engine.generate(PROMPTS, n=2, sampling=sampling)
        monkeypatch.undo()
        rows[mode] = counter.rows
    assert _completions(results[True]) == _completions(results[False])
    static = [lp for o in results[False].outputs for c in o.completions for lp in c.logprobs]
    continuous = [lp for o in results[True].outputs for c in o.completions for lp in c.logprobs]
    assert continuous == pytest.approx(static, abs=1e-4)
    assert rows[True] < rows[False]  # finished groups stopped being decoded
    assert results[True].batches > results[False].batches  # waiting requests were admitted as groups finished


def test_continuous_batching_streams_the_generated_text_and_reuses_cached_prefixes():
    loaded = load("tiny-qwen2")
    sampling = _long_tail(len(PROMPTS))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=4, continuous_batching=True)
    reference = Engine(loaded.model, loaded.tokenizer, max_batch_size=4, prefix_cache=False).generate(
        PROMPTS, n=2, sampling=sampling)
    pieces = {}
    for event in engine.stream(PROMPTS, n=2, sampling=sampling):
        pieces.setdefault((event.request, event.candidate), []).append(event.text)
    for i, out in enumerate(reference.outputs):
        for c in out.completions:
            assert "".join(pieces[(i, c.index)]) == c.text
    again = engine.generate(PROMPTS, n=2, sampling=sampling)  # prefixes now come from the prefix cache
    assert again.extra["prefix_cache"]["tokens_reused"] > 0
    assert _completions(again) == _completions(reference)


def test_regroup_moves_rows_with_their_keys_and_positions():
    loaded = load("tiny-qwen2")
    model, config = loaded.model, loaded.model.config
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS[:3]]
    fresh = functools.partial(make_cache, config, dtype=torch.float32, device="cpu")
    versions = LayerVersions("m", ("v",) * config.num_layers)
    with torch.inference_mode():
        cache, _ = prefill(model, prompts, 1, 4, 0, fresh, versions)
        moved = regroup([(cache, 2), (cache, 0)], 4, fresh)  # the padded short prompt first, reordered
        assert moved.batch == 2 and moved.length == max(len(prompts[2]), len(prompts[0]))
        assert moved.next_position.tolist() == [len(prompts[2]), len(prompts[0])]
        for new_row, old_row in ((0, 2), (1, 0)):
            old_slots = cache.key_valid[old_row].nonzero()[:, 0]
            new_slots = moved.key_valid[new_row].nonzero()[:, 0]
            torch.testing.assert_close(moved.read(new_row, new_slots), cache.read(old_row, old_slots), atol=0, rtol=0)
        ids = torch.tensor([[7], [9], [11]])
        expected = model.run(append_step(cache, 3, 1, logits="last"), input_ids=ids).logits[[2, 0]]
        got = model.run(append_step(moved, 2, 1, logits="last"), input_ids=ids[[2, 0]]).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(GenerationError, match="at least one row"):
        regroup([], 4, fresh)


@pytest.mark.parametrize("continuous", [False, True])
def test_each_candidate_gets_as_many_top_logprobs_as_it_asked_for(continuous):
    loaded = load("tiny-qwen2")
    asked = [1, 1, 5, 0, 2, 1, 3, 1]
    sampling = [SamplingParams(temperature=0.7, max_tokens=4 + 3 * i, seed=i, logprobs=k) for i, k in enumerate(asked)]
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=4, prefix_cache=False,
                    continuous_batching=continuous)
    for k, out in zip(asked, engine.generate(PROMPTS, n=2, sampling=sampling).outputs):
        for c in out.completions:
            assert (c.top_logprobs is None) if k == 0 else all(len(top) == k for top in c.top_logprobs)
