"""Stop strings on byte-level BPE (multi-byte characters, special tokens) and incremental detokenization:
bounded decode work per step, text equal to a full decode."""

import random

import pytest

from bpe import byte_level_bpe
from ember.engine import Engine, SamplingParams
from ember.engine.generate import _Candidate
from ember.engine.stop_strings import MAX_PENDING, IncrementalText
from ember.errors import GenerationError
from ember.models import load, packages
from ember.models.tokenizer import CharTokenizer

SMOLLM2 = "smollm2-135m-instruct"


def _tokenizer(name):
    if name == "bpe":
        return byte_level_bpe()
    if name == "char":
        return CharTokenizer()
    if not packages.is_ready(SMOLLM2):
        pytest.skip(f"{SMOLLM2} is not in the ember cache; run `make models` to fetch and convert it")
    from ember.models.tokenizer import load_tokenizer

    return load_tokenizer(packages.model_dir(SMOLLM2))


def _push_all(tokenizer, tokens, params):
    cand = _Candidate(0, 0, params, frozenset(), tokenizer, follow_text=False)
    for token in tokens:
        cand.push(token, 0.0, None)
        if cand.finish_reason is not None:
            break
    return cand


@pytest.mark.parametrize("name", ["bpe", SMOLLM2])
@pytest.mark.parametrize("text, stop, before", [("hello 世界 done", "世界", "hello "),
                                                ("emoji 😀 and", "😀", "emoji "), ("party 🎉", " 🎉", "party")])
def test_multibyte_stop_strings_fire_token_by_token(name, text, stop, before):
    """Hardening #1: the search began after a trailing U+FFFD that the next token turned into the match's first
    character, so stop strings with multi-byte characters never fired on byte-level BPE."""
    tokenizer = _tokenizer(name)
    tokens = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode(tokens[:k]) for k in range(len(tokens)))  # characters span tokens
    cand = _push_all(tokenizer, tokens, SamplingParams(stop=(stop,), max_tokens=64))
    assert cand.finish_reason == "stop"
    assert cand.result().text == before


def _random_tokens(tokenizer, count, seed):
    """Random ids, mostly from encoded text (real merges) and one in four anywhere in the vocabulary (partial and
    invalid UTF-8, special tokens)."""
    rng = random.Random(seed)
    pool = tokenizer.encode("hello 世界 done, emoji 😀 and 🎉 party! The quick brown fox \n\t 42 é ü")
    return [rng.randrange(tokenizer.vocab_size) if rng.random() < 0.25 else rng.choice(pool) for _ in range(count)]


@pytest.mark.parametrize("name", ["bpe", "char", SMOLLM2])
def test_incremental_text_equals_a_full_decode(name):
    """Hardening #6: decoding a bounded window per token gives exactly the text a full decode gives, and text
    once confirmed never changes."""
    tokenizer = _tokenizer(name)
    for seed in range(20):
        tokens = _random_tokens(tokenizer, 300, seed)
        text = IncrementalText(tokenizer)
        for k, token in enumerate(tokens, 1):
            text.push(token)
            assert tokenizer.decode(tokens[:k]).startswith(text.text)
        text.flush()
        assert text.text == tokenizer.decode(tokens)


class _CountingTokenizer:
    """A tokenizer that counts the tokens passed to decode."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, ids):
        ids = list(ids)
        self.decoded += len(ids)
        return self.inner.decode(ids)


@pytest.mark.parametrize("name", ["bpe", SMOLLM2])
def test_stop_check_decodes_a_bounded_window_per_step(name):
    """Hardening #6: every step decoded the whole completion (O(T^2) over T tokens); now at most
    10 * MAX_PENDING tokens a step, however long the completion, and the text still equals a full decode."""
    tokenizer = _CountingTokenizer(_tokenizer(name))
    tokens = _random_tokens(tokenizer.inner, 2048, seed=1)
    cand = _Candidate(0, 0, SamplingParams(stop=("never-seen-stop",), max_tokens=4096), frozenset(), tokenizer,
                      follow_text=False)
    per_step = []
    for token in tokens:
        before = tokenizer.decoded
        cand.push(token, 0.0, None)
        per_step.append(tokenizer.decoded - before)
    assert cand.finish_reason is None
    assert max(per_step) <= 10 * MAX_PENDING
    assert sum(per_step) <= 4 * len(tokens)
    cand.finish_reason = "length"
    cand.text.release(final=True)
    assert cand.result().text == tokenizer.inner.decode(tokens)


def test_detokenize_work_is_timed(engine_char):
    """Hardening #6: the host-side stop-string work ran outside every stage timer."""
    result = engine_char.generate(["Hello"], n=2, sampling=SamplingParams(max_tokens=8, stop=("zz",), seed=0,
                                                                          ignore_eos=True))
    assert result.timings["detokenize"] > 0


@pytest.fixture(scope="module")
def engine_char():
    loaded = load("tiny-llama")
    return Engine(loaded.model, loaded.tokenizer)


def test_stop_string_equal_to_a_special_token_matches_it(engine_char):
    """Hardening #13: decoding skips special tokens, so a stop string equal to one (here the char tokenizer's
    <eos>) never matched its text; it now matches the token, which is kept as a stop token is."""
    base = dict(temperature=1.0, max_tokens=400, ignore_eos=True)
    eos = engine_char.tokenizer.eos_token_id
    seed = next(s for s in range(50) if eos in engine_char.generate(
        ["Hello"], sampling=SamplingParams(**base, seed=s)).outputs[0].completions[0].token_ids)
    full = engine_char.generate(["Hello"], sampling=SamplingParams(**base, seed=seed)).outputs[0].completions[0]
    cut = full.token_ids.index(eos)
    stopped = engine_char.generate(["Hello"], sampling=SamplingParams(**base, seed=seed, stop=("<eos>",)))
    cand = stopped.outputs[0].completions[0]
    assert cand.finish_reason == "stop" and cand.token_ids == full.token_ids[:cut + 1]
    assert cand.text == engine_char.tokenizer.decode(full.token_ids[:cut])


def test_stop_string_holding_a_special_token_among_text_is_refused(engine_char):
    """Hardening #13: such a stop string can never match (the special token's text never shows): a clear error."""
    with pytest.raises(GenerationError, match="exactly one special token, found 'x<eos>', which contains the "
                                              "special token '<eos>'"):
        engine_char.generate(["Hello"], sampling=SamplingParams(stop=("x<eos>",)))


def test_im_end_stop_string_ends_a_smollm2_reply():
    """Hardening #13 on a real chat model: stop=("<|im_end|>",) ends the reply there even with ignore_eos."""
    _tokenizer(SMOLLM2)  # skips when the model is not cached
    loaded = load(SMOLLM2)
    engine = Engine(loaded.model, loaded.tokenizer, prefix_cache=False)
    prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi in three words."}])
    base = dict(temperature=0, max_tokens=48, ignore_eos=True)
    full = engine.generate([prompt], sampling=SamplingParams(**base)).outputs[0].completions[0]
    (im_end,) = loaded.tokenizer.encode("<|im_end|>")
    assert im_end in full.token_ids
    cand = engine.generate([prompt], sampling=SamplingParams(**base, stop=("<|im_end|>",))).outputs[0].completions[0]
    assert cand.finish_reason == "stop" and cand.token_ids == full.token_ids[:full.token_ids.index(im_end) + 1]


def test_stop_strings_count_only_when_they_complete_after_min_tokens(engine_char):
    """A stop string inside the first min_tokens tokens does not end the candidate; a later one does."""
    base = dict(temperature=1.0, max_tokens=60, seed=11, ignore_eos=True)
    full = engine_char.generate(["Hello"], sampling=SamplingParams(**base)).outputs[0].completions[0]
    early = len(engine_char.tokenizer.decode(full.token_ids[:20]))
    stop = next(ch for ch in full.text[:early] if ch in full.text[early:])  # occurs before and after
    cand = engine_char.generate(["Hello"], sampling=SamplingParams(**base, stop=(stop,), min_tokens=20))
    cand = cand.outputs[0].completions[0]
    assert cand.finish_reason == "stop" and cand.text == full.text[:full.text.index(stop, early)]


def test_a_stop_string_that_completed_before_min_tokens_does_not_cut_the_text_later():
    """Passed over before min_tokens ("e" at 0 and 1), the first stop counted is the one completing after."""
    from ember.engine.stop_strings import StopText

    tokenizer = CharTokenizer()
    stop = StopText(tokenizer, ("e", "a "))
    ids = tokenizer.encode("eee")
    assert not stop.push(ids[0], search=False) and not stop.push(ids[1], search=False)
    assert stop.push(ids[2])
    assert stop.text == "ee"
