"""Cache-to-cache communication: selection, RD allocation, byte caps, text truncation, the wire bytes of every
sample, and context transfer against the receiver reading the context itself."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.comm.harness import Harness, parse_method
from ember.comm.items import comm_items
from ember.comm.text import truncate_utf8
from ember.comm.transfer import KVMethod, encode_context, receive
from ember.engine import Engine, SamplingParams
from ember.engine.past import PastKV
from ember.errors import CommError, GenerationError
from ember.kv.allocate import allocate, payload_for
from ember.kv.select import SELECTION_MODES, count_for_cap, count_for_proportion, token_scores, top_tokens
from ember.kv.wire import WireConfig, expected_size, inspect, pack, unpack
from ember.models.step import Step

CHEAP_MODES = ("front", "back", "random", "knorm", "vnorm")


def _kv(layers=3, heads=2, tokens=20, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, heads, tokens, dim, generator=generator)  # (L, 2, H, T, D)


@pytest.mark.parametrize("mode", CHEAP_MODES)
def test_selection_at_proportion_one_is_full_transfer(mode):
    kv = _kv()
    k, v = kv[:, 0], kv[:, 1]
    kept = top_tokens(token_scores(mode, k, v, seed=3), count_for_proportion(20, 1.0))
    assert kept.tolist() == list(range(20))
    full = encode_context(kv, KVMethod("front", ("fp16",)), cap=None)
    selected = encode_context(kv, KVMethod(mode, ("fp16",)), cap=None, seed=3)
    assert selected.blob == full.blob
    decoded = unpack(full.blob)
    assert torch.equal(decoded.k, k.half()) and torch.equal(decoded.v, v.half())


@settings(max_examples=60, deadline=None)
@given(cap=st.integers(0, 6000), tokens=st.integers(1, 40), mode=st.sampled_from(CHEAP_MODES),
       precision=st.sampled_from(["int4", "int8", "fp16"]), seed=st.integers(0, 5))
def test_rd_with_one_precision_is_selection_at_the_same_bytes(cap, tokens, mode, precision, seed):
    kv = _kv(tokens=tokens, seed=seed)
    k, v = kv[:, 0], kv[:, 1]
    scores = token_scores(mode, k, v, seed=seed)
    config = WireConfig(precision, "token")
    rd = allocate(scores, ("drop", precision), config, 3, 2, 8, cap, tokens)
    count = count_for_cap(config, tuple(k.shape), cap, tokens)
    chosen = [i for i, g in enumerate(rd.groups) if g != "drop"]
    assert chosen == top_tokens(scores, count).tolist()
    assert rd.nbytes == (expected_size(config, 3, 2, 8, count, max_position=tokens - 1) if count else 0)


@settings(max_examples=80, deadline=None)
@given(cap=st.integers(0, 20000), tokens=st.integers(1, 60), mode=st.sampled_from(CHEAP_MODES),
       candidates=st.sampled_from([("drop", "int8"), ("drop", "int4", "int8"), ("drop", "int4", "int8", "fp16"),
                                   ("drop", "int4", "fp16")]),
       granularity=st.sampled_from(["token", "head", "kivi", "layer", "tensor"]), block=st.sampled_from([1, 3]),
       seed=st.integers(0, 5))
def test_no_sample_exceeds_its_cap_and_bytes_are_the_blob(cap, tokens, mode, candidates, granularity, block, seed):
    kv = _kv(tokens=tokens, seed=seed)
    method = KVMethod(mode, candidates[1:], granularity=granularity, block_tokens=block)
    encoded = encode_context(kv, method, cap, seed=seed)
    assert encoded.nbytes <= cap
    if encoded.blob is None:
        assert encoded.nbytes == 0 and encoded.tokens_sent == 0
    else:
        assert encoded.nbytes == len(encoded.blob) == inspect(encoded.blob).breakdown["total"]
        payload, scheme = payload_for(kv[:, 0], kv[:, 1], encoded.groups, tokens)
        assert len(pack(payload, method.wire_config(scheme))) == encoded.nbytes
        assert unpack(encoded.blob).positions.tolist() == [i for i, g in enumerate(encoded.groups) if g != "drop"]


def test_rd_spends_a_larger_cap_on_more_or_finer_tokens():
    kv = _kv(tokens=30)
    method = KVMethod("knorm", ("int4", "int8"))
    all_int4 = encode_context(kv, KVMethod("knorm", ("int4",)), None).nbytes
    all_int8 = encode_context(kv, KVMethod("knorm", ("int8",)), None).nbytes
    small, middle = encode_context(kv, method, all_int4 // 3), encode_context(kv, method, (all_int4 + all_int8) // 2)
    assert 0 < small.tokens_sent < 30 and set(small.groups) == {"drop", "int4"}  # breadth before precision
    assert middle.tokens_sent == 30 and {"int4", "int8"} <= set(middle.groups)
    assert inspect(middle.blob).has_map
    best = token_scores("knorm", kv[:, 0], kv[:, 1]).argmax()
    assert middle.groups[best] == "int8"  # the best-scored token is upgraded first
    assert encode_context(kv, method, all_int8 + 100).groups == ["int8"] * 30


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40), cap=st.integers(0, 200))
def test_text_truncation_never_splits_a_character(text, cap):
    cut, truncated = truncate_utf8(text, cap)
    data = cut.encode("utf-8")
    assert len(data) <= cap and text.startswith(cut)
    assert truncated == (len(text.encode("utf-8")) > cap)
    if truncated:  # the longest prefix that fits: one more character would not
        assert len(text[:len(cut) + 1].encode("utf-8")) > cap


def test_truncation_of_multibyte_text():
    assert truncate_utf8("héllo", 2) == ("h", True)
    assert truncate_utf8("héllo", 3) == ("hé", True)
    assert truncate_utf8("日本", 5) == ("日", True)
    with pytest.raises(CommError, match="byte cap"):
        truncate_utf8("x", -1)


def test_projection_scores_need_a_projection():
    kv = _kv()
    with pytest.raises(CommError, match="no projection"):
        token_scores("proj_vnorm", kv[:, 0], kv[:, 1])
    with pytest.raises(CommError, match="receiver's own V"):
        token_scores("delta_proj_vnorm", kv[:, 0], kv[:, 1], projected_v=kv[:, 1])
    delta = token_scores("delta_proj_vnorm", kv[:, 0], kv[:, 1], projected_v=kv[:, 1], receiver_v=kv[:, 1] * 0)
    assert torch.equal(delta, token_scores("vnorm", kv[:, 0], kv[:, 1]))
    with pytest.raises(CommError, match="selection mode"):
        token_scores("best", kv[:, 0], kv[:, 1])
    assert set(SELECTION_MODES) >= set(CHEAP_MODES)


@pytest.mark.parametrize("spec,error", [("kv:knorm", "expected one of"), ("rd:knorm:int8", "'rd' several"),
                                        ("kv:knorm:int4+int8", "'kv' takes one"), ("kv:magic:int8", "selection"),
                                        ("kv:front:int2", "precisions"), ("zip", "expected one of")])
def test_bad_method_specs_are_named(spec, error):
    with pytest.raises(CommError, match=error):
        parse_method(spec)


# ---- the engine continuing after received K/V --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return Engine.load("tiny-llama", seed=3, prefix_cache=False)


def test_past_with_gaps_matches_attention_that_hides_the_dropped_tokens(tiny):
    """K/V of a subset of context tokens, placed at their positions, gives the logits of a full forward in which
    the tail cannot see the dropped tokens (the kept tokens' K/V still saw the whole context)."""
    head, context, tail = list(range(10, 15)), list(range(20, 40)), list(range(50, 56))
    keep = torch.tensor([0, 3, 4, 9, 15, 19])
    kv, _ = tiny.prefill_kv(head + context, use_prefix_cache=False)
    received = kv[:, :, :, len(head) + keep]
    past = PastKV(torch.cat([kv[:, :, :, :len(head)], received], dim=3), len(head) + len(context))
    sampling = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    got = tiny.generate([tail], sampling=sampling, past=[past]).outputs[0].completions[0].top_logprobs[0]
    ids = torch.tensor([head + context + tail])
    total = ids.shape[1]
    visible = torch.ones(total, total, dtype=torch.bool).tril()
    dropped = torch.ones(len(context), dtype=torch.bool)
    dropped[keep] = False
    tail_rows = slice(len(head) + len(context), total)
    visible[tail_rows, len(head):len(head) + len(context)] &= ~dropped
    step = Step(positions=torch.arange(total)[None], mask=visible[None, None], causal=False)
    with torch.no_grad():
        logits = tiny.model.run(step, input_ids=ids).logits[0, -1]
    want = torch.log_softmax(logits.float(), -1).topk(5)
    assert list(got) == want.indices.tolist()
    assert torch.allclose(torch.tensor(list(got.values())), want.values, atol=1e-4)


def test_bad_pasts_are_refused(tiny):
    config = tiny.model.config
    good = torch.zeros(config.num_layers, 2, config.num_kv_heads, 3, config.head_dim)
    with pytest.raises(GenerationError, match="one PastKV per prompt"):
        tiny.generate([[5, 6]], past=[])
    with pytest.raises(GenerationError, match="shape"):
        tiny.generate([[5, 6]], past=[PastKV(good[:1], 3)])
    with pytest.raises(GenerationError, match="next_position"):
        tiny.generate([[5, 6]], past=[PastKV(good, 2)])
    with pytest.raises(GenerationError, match="finite"):
        tiny.generate([[5, 6]], past=[PastKV(good * float("nan"), 3)])
    with pytest.raises(GenerationError, match="context length"):
        tiny.generate([[5, 6]], past=[PastKV(good, config.max_position_embeddings)])


def test_harness_rows_measure_bytes_and_respect_caps(tiny):
    items = comm_items("recall", 3, seed=0, facts=3)
    harness = Harness(tiny, tiny, items, max_tokens=4)
    caps = [0, 150, 3000, None]
    rows = harness.run(["alone", "context", "text:raw", "kv:knorm:int8", "rd:front:int4+int8"], caps)
    assert len(rows) == 2 * 3 + 3 * len(caps) * 3
    for row in rows:
        if row["cap"] is not None:
            assert row["bytes"] <= row["cap"] and row["slack"] == row["cap"] - row["bytes"]
        if row["family"] in ("kv", "rd") and row["tokens_sent"]:
            assert row["bytes"] == row["bytes_total"]
    full = [r for r in rows if r["method"] == "kv:knorm:int8" and r["cap"] is None]
    assert all(r["tokens_sent"] == r["context_tokens"] for r in full)
    alone = [r["output"] for r in rows if r["method"] == "alone"]
    assert [r["output"] for r in rows if r["method"] == "kv:knorm:int8" and r["cap"] == 0] == alone


def test_identical_pair_full_fp16_transfer_reproduces_reading_the_context(package_model):
    """The real SmolLM2 as its own sharer: fp16 K/V of every context token gives the receiver the greedy tokens
    it produces when it reads the context itself."""
    package_model("smollm2-135m-instruct")
    engine = Engine.load("smollm2-135m-instruct", prefix_cache=False)
    items = comm_items("recall", 3, seed=0, facts=4)
    rows = Harness(engine, engine, items, max_tokens=10).run(["context", "kv:front:fp16"], [None])
    by_method = {m: [r["output"] for r in rows if r["method"] == m] for m in ("context", "kv:front:fp16")}
    assert by_method["kv:front:fp16"] == by_method["context"]
    assert any(by_method["context"])


def test_receive_puts_the_question_after_the_whole_context():
    kv = _kv(tokens=10)
    encoded = encode_context(kv, KVMethod("back", ("int8",)), cap=1500)
    head = torch.zeros(3, 2, 2, 4, 8)
    past, _, _ = receive(encoded.blob, head, 10, "cpu", torch.float32)
    assert past.tokens == 4 + encoded.tokens_sent and past.next_position == 14


def test_extraction_items_send_the_document_and_score_exact_json():
    item = comm_items("extraction", 1, seed=4, facts=2)[0]
    assert item.item_id == "extraction-4" and "Schema:" in item.question and item.context not in item.question
    assert item.score(item.answer) and not item.score("{}") and not item.score("no json")
    with pytest.raises(CommError, match="task"):
        comm_items("poetry", 1, seed=0)
