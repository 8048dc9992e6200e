"""The pipeline split: a decoder's layers over two devices (here two CPU stages) generate exactly what the
unsplit model does, through the engine, with its cache split by stage."""

import pytest
import torch

from ember.engine import Engine, SamplingParams
from ember.engine.pipeline import PipelineCache, PipelineModel
from ember.errors import GenerationError
from ember.models import load

PROMPTS = ["Alice has code 4821.", "Hi", "Bob keeps a red box and a blue one in the shed."]
SAMPLED = SamplingParams(temperature=0.8, max_tokens=12, seed=3, logprobs=2)


def _run(engine):
    result = engine.generate(PROMPTS, n=2, sampling=SAMPLED)
    return [(c.token_ids, c.logprobs, c.top_logprobs) for o in result.outputs for c in o.completions]


@pytest.mark.parametrize("family, micro_batches", [("tiny-qwen2", 1), ("tiny-llama", 2), ("tiny-qwen3", 3)])
def test_two_cpu_stages_generate_exactly_the_unsplit_models_tokens(family, micro_batches):
    reference = _run(Engine(load(family).model, load(family).tokenizer, prefix_cache=False))
    loaded = load(family)  # same seeded weights, split in place
    split = 1
    piped = PipelineModel(loaded.model, split, ("cpu", "cpu"), micro_batches=micro_batches)
    engine = Engine(piped, loaded.tokenizer, prefix_cache=False)
    if micro_batches == 1:
        assert _run(engine) == reference  # the same kernels on the same rows: bit for bit
    else:  # row-wise the same computation; matmuls over fewer rows may round differently
        got = _run(engine)
        assert [r[0] for r in got] == [r[0] for r in reference]
        assert [lp for r in got for lp in r[1]] == pytest.approx([lp for r in reference for lp in r[1]], abs=1e-5)
    cache = engine._fresh_cache(2, 8)
    assert isinstance(cache, PipelineCache) and cache.stages[0].shape[0] == split
    assert cache.stages[1].shape[0] == loaded.model.config.num_layers - split


def test_the_split_engine_reuses_prefixes_and_continues_batches_as_the_unsplit_one():
    loaded = load("tiny-qwen2")
    reference = _run(Engine(loaded.model, loaded.tokenizer, prefix_cache=False))
    piped = PipelineModel(load("tiny-qwen2").model, 1, ("cpu", "cpu"), micro_batches=2)
    engine = Engine(piped, loaded.tokenizer, max_batch_size=2, continuous_batching=True)
    first = _run(engine)  # one prompt group at a time, re-formed as groups finish
    assert [r[0] for r in first] == [r[0] for r in reference]
    assert [lp for r in first for lp in r[1]] == pytest.approx([lp for r in reference for lp in r[1]], abs=1e-4)
    again = engine.generate(PROMPTS, n=2, sampling=SAMPLED)
    assert again.extra["prefix_cache"]["tokens_reused"] > 0
    assert [c.token_ids for o in again.outputs for c in o.completions] == [r[0] for r in reference]


def test_bad_splits_are_clear_errors():
    model = load("tiny-qwen2").model
    with pytest.raises(GenerationError, match="expected 0 < split < 2 layers, found 2"):
        PipelineModel(model, 2, ("cpu", "cpu"))
    with pytest.raises(GenerationError, match="expected two, found 1"):
        PipelineModel(model, 1, ("cpu",))
    piped = PipelineModel(model, 1, ("cpu", "cpu"))
    with pytest.raises(GenerationError, match="share_prompt_kv"):
        piped.make_cache(4, 8, torch.float32, group=2, prompt_slots=4)
