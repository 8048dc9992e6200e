"""The fuser follows DESIGN.md section 8 (layer map, gates, residual output, projection-only control), and token
alignment pairs one sharer token with each receiver token on the real tokenizers."""

import pytest
import torch

from ember.comm.align import align_content, align_prompt, pad_section
from ember.comm.fuser import Fuser, layer_map
from ember.errors import CommError
from ember.models.presets import preset_config


def test_layer_map_is_last_aligned_and_clamped():
    assert layer_map(24, 30) == [t + 6 for t in range(24)]  # deeper sharer: its last 24 layers
    assert layer_map(28, 24)[:5] == [0, 0, 0, 0, 0] and layer_map(28, 24)[-1] == 23
    assert layer_map(28, 24) == [max(t - 4, 0) for t in range(28)]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(3, 1) == [0, 0, 0]
    with pytest.raises(CommError, match="layers"):
        layer_map(0, 3)


def _pair(hidden=16, trained=True):
    """A fuser for a 3-layer receiver and a 2-layer sharer; `trained` gives its projection heads random
    weights (a fresh fuser's are zero)."""
    receiver = preset_config("tiny-qwen2", num_layers=3)
    sharer = preset_config("tiny-llama", num_layers=2, num_kv_heads=1, head_dim=8)
    torch.manual_seed(0)
    fuser = Fuser(receiver, sharer, hidden)
    if trained:
        for layer in fuser.paths:
            for path in layer:
                torch.nn.init.normal_(path.project.weight)
    return fuser, receiver, sharer


def test_a_fresh_fuser_is_the_receiver_with_every_gate_open():
    fuser, receiver, sharer = _pair(trained=False)
    mine, theirs = _kvs(receiver, sharer)
    fuser.eval()
    assert fuser.gates().eq(1).all()
    with torch.no_grad():
        assert torch.equal(fuser(mine, theirs), mine)


def _kvs(receiver, sharer, b=2, tokens=5):
    mine = torch.randn(receiver.num_layers, 2, b, receiver.num_kv_heads, tokens, receiver.head_dim)
    theirs = torch.randn(sharer.num_layers, 2, b, sharer.num_kv_heads, tokens, sharer.head_dim)
    return mine, theirs


def test_closed_gates_keep_the_receiver_cache_exactly():
    fuser, receiver, sharer = _pair()
    mine, theirs = _kvs(receiver, sharer)
    fuser.eval()
    with torch.no_grad():
        fuser.gate_logits.fill_(-1.0)
        assert torch.equal(fuser(mine, theirs), mine)
        fuser.gate_logits[1, 0] = 2.0  # open layer 1's K path only
        fused = fuser(mine, theirs)
    changed = (fused != mine).flatten(2).any(-1)  # (L, 2)
    assert changed.tolist() == [[False, False], [True, False], [False, False]]


def test_open_gate_adds_weight_times_projection_reading_the_mapped_sharer_layer():
    fuser, receiver, sharer = _pair()
    mine, theirs = _kvs(receiver, sharer)
    fuser.eval()
    with torch.no_grad():
        fuser.gate_logits.fill_(1.0)
        fused = fuser(mine, theirs)
        layer, role = 2, 1
        path = fuser.paths[layer][role]
        flat = lambda x: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)  # noqa: E731
        projection, weight = path(flat(theirs[fuser.layer_map[layer], role]), flat(mine[layer, role]))
        heads = receiver.num_kv_heads
        projection = projection.view(2, 5, heads, -1).transpose(1, 2)
        want = mine[layer, role] + weight.transpose(1, 2)[..., None] * projection
        assert torch.allclose(fused[layer, role], want, atol=1e-6)
        assert torch.allclose(fuser(mine, theirs, projection_only=True)[layer, role], projection, atol=1e-6)
        assert ((weight > 0) & (weight < 1)).all()
    theirs_changed = theirs.clone()
    theirs_changed[0] += 1  # sharer layer 0 is read by receiver layer 0 only (map [0, 0, 1]: layers 0 and 1)
    assert fuser.layer_map == [0, 0, 1]
    with torch.no_grad():
        again = fuser(mine, theirs_changed)
    assert torch.equal(again[2], fused[2]) and not torch.equal(again[0], fused[0])


def test_training_gates_are_gumbel_sigmoid_annealed_to_hard():
    fuser, _, _ = _pair()
    fuser.train()
    with torch.no_grad():
        fuser.gate_logits.copy_(torch.tensor([[3.0, -3.0], [0.5, -0.5], [0.0, 0.0]]))
    torch.manual_seed(0)
    soft = fuser.gates()
    assert ((soft > 0) & (soft < 1)).all()
    assert fuser.anneal(0.0) == 1.0 and fuser.anneal(1.0) == pytest.approx(0.001)
    samples = torch.stack([fuser.gates() for _ in range(200)])
    assert ((samples < 1e-3) | (samples > 1 - 1e-3)).float().mean() > 0.95  # nearly hard at temperature 0.001
    assert samples[:, 0, 0].mean() > 0.9 and samples[:, 0, 1].mean() < 0.1
    fuser.eval()
    assert fuser.gates().tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]


def test_gradients_reach_the_fuser_only():
    fuser, receiver, sharer = _pair()
    mine, theirs = _kvs(receiver, sharer)
    mine.requires_grad_(False)
    fuser.train()
    fuser(mine, theirs).pow(2).sum().backward()
    assert fuser.gate_logits.grad is not None and fuser.paths[0][0].inp.weight.grad is not None


def test_mismatched_shapes_are_named():
    fuser, receiver, sharer = _pair()
    mine, theirs = _kvs(receiver, sharer)
    with pytest.raises(CommError, match="align tokens first"):
        fuser(mine, theirs[:, :, :, :, :4])
    with pytest.raises(CommError, match="sharer K/V"):
        fuser(mine, mine)
    with pytest.raises(CommError, match="receiver K/V"):
        fuser(theirs, theirs)


def test_width_is_a_parameter():
    small, _, _ = _pair(hidden=8)
    large, _, _ = _pair(hidden=64)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(large)


def test_pad_section():
    assert pad_section([5, 6], 4, 0) == ([0, 0, 5, 6], [False, False, True, True])
    assert pad_section([1, 2, 3, 4, 5], 3, 0) == ([3, 4, 5], [True, True, True])


@pytest.fixture
def tokenizers(package_model):
    from ember.models.tokenizer import load_tokenizer

    return (load_tokenizer(package_model("qwen2.5-0.5b-instruct")),
            load_tokenizer(package_model("smollm2-135m-instruct")))


def test_alignment_on_the_real_tokenizers(tokenizers):
    receiver, sharer = tokenizers
    messages = [{"role": "user", "content": "The code for Alice is 4821. Héllo wörld, naïve café 日本語!"}]
    aligned = align_prompt(receiver, sharer, messages)
    assert len(aligned.sharer_ids) == len(aligned.receiver_ids) == len(aligned.sharer_valid)
    body = receiver.encode(messages[0]["content"])
    ids, valid = align_content(receiver, sharer, body)
    for r, s, ok in zip(body, ids, valid):
        if ok:  # the kept sharer token is a piece of the receiver token's text
            assert sharer.decode([s]).strip() in receiver.decode([r])
    assert sum(valid) >= len(body) - 2
    same, _ = align_content(receiver, receiver, body)
    assert same == body  # one tokenizer: the identity
    assert aligned.receiver_ids[-3:] == receiver.encode(receiver.apply_chat_template(messages))[-3:]


def test_context_transfer_parts_align_the_sharer_to_the_receivers_tokens(tokenizers):
    from ember.comm.align import sharer_parts
    from ember.comm.prompt import prompt_parts

    receiver, sharer = tokenizers
    context, question = "The code for Alice is 4821. Héllo wörld, naïve café!", "What is Alice's code?"
    parts = sharer_parts(receiver, sharer, context, question)
    own = prompt_parts(sharer, context, question)
    assert len(parts.context) == len(receiver.encode(context)) and parts.context != own.context
    assert (parts.head, parts.tail) == (own.head, own.tail)  # the sharer's own chat template
    assert parts.context == align_content(receiver, sharer, receiver.encode(context))[0]
    assert sharer_parts(receiver, receiver, context, question) == prompt_parts(receiver, context, question)
