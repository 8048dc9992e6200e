"""Engine.stream and `ember generate`: streamed tokens, logprobs and text equal what generate returns."""

import json
from collections import defaultdict

import pytest
import torch

from bpe import byte_level_bpe
from ember import cli
from ember.engine import Engine, SamplingParams
from ember.errors import GenerationError
from ember.models import load, random_model
from ember.models.presets import preset_config

PROMPTS = ["The code for Alice is 4821.", "Hello", "A much longer prompt that needs left padding in a batch"]


def _by_candidate(events):
    """{(request, candidate): [events]} in arrival order."""
    grouped = defaultdict(list)
    for event in events:
        grouped[event.request, event.candidate].append(event)
    return grouped


def _assert_stream_matches(engine, prompts, n, sampling):
    result = engine.generate(prompts, n=n, sampling=sampling)
    streamed = _by_candidate(engine.stream(prompts, n=n, sampling=sampling))
    assert len(streamed) == len(prompts) * n
    for r, out in enumerate(result.outputs):
        for cand in out.completions:
            events = streamed[r, cand.index]
            assert [e.token_id for e in events] == cand.token_ids
            # the second call reuses the first one's cached prefix: fp32 sums in another order, within 1e-5
            assert [e.logprob for e in events] == pytest.approx(cand.logprobs, abs=1e-5)
            assert "".join(e.text for e in events) == cand.text
            assert [e.finish_reason for e in events] == [None] * (len(events) - 1) + [cand.finish_reason]
    return result


def test_streamed_tokens_and_text_equal_generate():
    """Hardening #18: same seeds, same tokens; per candidate the text deltas join to the completion's text,
    including candidates cut by stop strings (text that may begin a stop string is held back) and micro-batches."""
    loaded = load("tiny-llama")
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=4)
    sampling = [SamplingParams(temperature=1.0, max_tokens=30, seed=3, stop=("e ", "on")),
                SamplingParams(temperature=0.8, max_tokens=12, seed=4, ignore_eos=True),
                SamplingParams(temperature=1.0, max_tokens=25, seed=5, stop=("\n",), min_tokens=4)]
    result = _assert_stream_matches(engine, PROMPTS, 3, sampling)
    assert result.batches == 3
    assert {c.finish_reason for out in result.outputs for c in out.completions} == {"stop", "length"}


def test_streamed_text_on_byte_level_bpe_equals_a_full_decode():
    """Random weights over a byte-level BPE vocabulary draw partial and invalid UTF-8 all the time: streamed
    deltas hold an incomplete character back and still join to exactly tokenizer.decode(token_ids)."""
    tokenizer = byte_level_bpe()
    model = random_model(preset_config("tiny-llama", vocab_size=tokenizer.vocab_size), torch.float32,
                         torch.device("cpu"), seed=0)
    engine = Engine(model, tokenizer)
    sampling = SamplingParams(temperature=1.0, max_tokens=64, seed=9, ignore_eos=True)
    result = _assert_stream_matches(engine, ["hello 世界", "emoji 😀"], 4, sampling)
    for out in result.outputs:
        for cand in out.completions:
            assert cand.text == tokenizer.decode(cand.token_ids)
    assert any("\ufffd" in c.text or any(ord(ch) > 127 for ch in c.text)
               for out in result.outputs for c in out.completions)
    _assert_stream_matches(engine, ["hello 世界", "emoji 😀"], 4,
                           SamplingParams(temperature=1.0, max_tokens=64, seed=9, ignore_eos=True, stop=("世", "o")))


def test_stream_is_lazy_and_checks_arguments_first():
    loaded = load("tiny-qwen3")
    engine = Engine(loaded.model, loaded.tokenizer)
    with pytest.raises(GenerationError, match="n: expected an integer >= 1, found True"):
        engine.stream(["Hello"], n=True)  # before any event is asked for
    sampling = SamplingParams(temperature=1.0, max_tokens=40, seed=1, ignore_eos=True)
    events = engine.stream(["Hello"], n=2, sampling=sampling)
    first = [next(events), next(events)]
    assert [(e.request, e.candidate, e.finish_reason) for e in first] == [(0, 0, None), (0, 1, None)]
    events.close()  # stopping early is fine: the engine is free for the next call
    result = engine.generate(["Hello"], n=2, sampling=sampling)
    assert [e.token_id for e in first] == [c.token_ids[0] for c in result.outputs[0].completions]


def test_cli_generate_streams_text_and_json_lines(capsys):
    """`ember generate` prints the completions as they are produced, or one JSON object per token."""
    argv = ["generate", "--model", "tiny-qwen3", "--prompt", "Hello", "--n", "2", "--max-tokens", "10",
            "--temperature", "0.8", "--seed", "7"]
    loaded = load("tiny-qwen3")
    reference = Engine(loaded.model, loaded.tokenizer).generate(
        ["Hello"], n=2, sampling=SamplingParams(temperature=0.8, max_tokens=10, seed=7)).outputs[0].completions
    assert cli.main(argv + ["--jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert set(lines[0]) == {"request", "candidate", "token_id", "text", "logprob", "finish_reason"}
    for cand in reference:
        mine = [line for line in lines if line["candidate"] == cand.index]
        assert [line["token_id"] for line in mine] == cand.token_ids
        assert "".join(line["text"] for line in mine) == cand.text
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "".join(f"[request 0, candidate {c.index}]\n{c.text}\n[{c.finish_reason}]\n"
                                              for c in reference)
    assert cli.main(argv[:5]) == 0  # n = 1: the text alone
    single = Engine(loaded.model, loaded.tokenizer).generate(["Hello"], sampling=SamplingParams(max_tokens=64, seed=0))
    assert capsys.readouterr().out == single.outputs[0].completions[0].text + "\n"
    assert cli.main(argv + ["--temperature", "-1"]) == 2
    assert "ember: error: SamplingParams.temperature: expected >= 0" in capsys.readouterr().err
