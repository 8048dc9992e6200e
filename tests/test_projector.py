"""The context-transfer projector: position handling, an identity projector against the receiver reading the
context itself (loss and greedy tokens), training, export and load, and a pair of other cache shapes end to end."""

import pytest
import torch

from ember.comm.data import TRAIN_SEED_BASE, transfer_training_items
from ember.comm.harness import Harness
from ember.comm.items import comm_items
from ember.comm.kv_forward import capture_kv
from ember.comm.projector import Projector
from ember.comm.train_fuser import FuserConfig, export_fuser, load_fuser, train_fuser
from ember.comm.transfer_training import IGNORE, transfer_batch, transfer_loss
from ember.engine import Engine
from ember.errors import CommError
from ember.models.loader import random_model
from ember.models.presets import preset_config
from ember.models.rotary import rerotate
from ember.train.tokens import Example, answer_nll

WIDER = dict(num_layers=3, num_kv_heads=1, head_dim=32, rope_theta=50000.0)  # a sharer of another cache shape


@pytest.fixture(scope="module")
def tiny():
    return Engine.load("tiny-qwen2", seed=1, prefix_cache=False)


@pytest.fixture(scope="module")
def other_shape(tiny):
    config = preset_config("tiny-llama", **WIDER)
    return Engine(random_model(config, torch.float32, torch.device("cpu"), 5), tiny.tokenizer, prefix_cache=False)


def _identity(projector: Projector) -> Projector:
    """Every path the identity map (hidden = KV width): the projector returns the sharer's own K/V."""
    with torch.no_grad():
        for path in (p for layer in projector.paths for p in layer):
            for linear in (path.inp, path.project):
                linear.weight.copy_(torch.eye(linear.weight.shape[0]))
                linear.bias.zero_()
            path.down.weight.zero_()
            path.down.bias.zero_()
    return projector.eval()


def _items(count=3, facts=2):
    return comm_items("recall", count, TRAIN_SEED_BASE + 7, facts=facts)


def test_keys_are_projected_free_of_position(tiny, other_shape):
    projector = Projector(tiny.model.config, other_shape.model.config, hidden=8).eval()
    torch.manual_seed(0)
    kv = torch.randn(3, 2, 1, 1, 5, 32)  # (L_s, 2, b, H_s, T, D_s), keys rotated at 0..4
    at = torch.arange(5)[None]
    shifted = kv.clone()
    shifted[:, 0] = rerotate(kv[:, 0].reshape(3, 1, 5, 32), at, at + 9, 50000.0).reshape(3, 1, 1, 5, 32)
    with torch.no_grad():
        base = projector(kv, at, at + 2)
        moved = projector(shifted, at + 9, at + 2)  # the same tokens, rotated at other sharer positions
        later = projector(kv, at, at + 6)
    assert torch.allclose(base, moved, atol=1e-4)
    assert torch.allclose(base[:, 1], later[:, 1])  # values carry no position
    keys, later_keys = base[:, 0, 0], later[:, 0, 0]  # (L_r, H_r, T, D_r): layers as the batch
    layers = keys.shape[0]
    moved_keys = rerotate(keys, (at + 2).expand(layers, 5), (at + 6).expand(layers, 5), 10000.0)
    assert torch.allclose(moved_keys, later_keys, atol=1e-5)  # receiver positions only rotate the output


def test_projector_refuses_kv_of_another_shape(tiny, other_shape):
    projector = Projector(tiny.model.config, other_shape.model.config, hidden=8)
    with pytest.raises(CommError, match="sharer K/V: expected"):
        projector(torch.zeros(2, 2, 1, 2, 4, 16), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))


def test_identity_projector_loss_is_the_receiver_reading_the_context(tiny):
    projector = _identity(Projector(tiny.model.config, tiny.model.config, hidden=32))
    items = _items()
    batch = transfer_batch(items, tiny.tokenizer, tiny.tokenizer, "cpu")
    with torch.no_grad():
        loss = transfer_loss(tiny.model, tiny.model, projector, batch)
    reference = []
    for row in range(len(items)):
        prompt = batch.receiver_ids[row][batch.receiver_valid[row]].tolist()
        tail_and_answer = batch.new_ids[row][batch.new_valid[row]].tolist()
        targets = batch.targets[row][batch.targets[row] != IGNORE].tolist()
        tail = tail_and_answer[:len(tail_and_answer) - len(targets) + 1]
        reference.append(Example(prompt + tail, targets))
    with torch.no_grad():
        nll, count = answer_nll(tiny.model, reference)
    assert loss.item() == pytest.approx((nll.sum() / count.sum()).item(), rel=1e-4)


def test_identity_projector_transfer_gives_the_context_methods_tokens(tiny):
    projector = _identity(Projector(tiny.model.config, tiny.model.config, hidden=32))
    items = comm_items("recall", 3, 0, facts=2)
    harness = Harness(tiny, tiny, items, max_tokens=5, projector=projector, progress=False)
    rows = harness.run(["context", "kv:front:fp16", "kv:proj_vnorm:fp16"], [None])
    by = {(r["method"], r["item_id"]): r for r in rows}
    for item in items:
        assert by[("kv:front:fp16", item.item_id)]["output"] == by[("context", item.item_id)]["output"]
        assert by[("kv:proj_vnorm:fp16", item.item_id)]["output"] == by[("context", item.item_id)]["output"]
        assert by[("kv:front:fp16", item.item_id)]["project_ms"] >= 0.0


def test_a_projector_trains_exports_and_runs_a_pair_of_other_shapes(tiny, other_shape, tmp_path):
    items = transfer_training_items(6, seed=0, extraction_share=0.5, facts=2)
    assert all(int(item.item_id.split("-")[1]) >= TRAIN_SEED_BASE for item in items)
    run = train_fuser(tiny, other_shape, items, FuserConfig(hidden=8, steps=3, batch=3, checkpoint_every=2),
                      folder=tmp_path / "work", kind="projector", progress=False)
    assert run.finished and len(run.history) == 3 and "gates_open" not in run.history[-1]
    export_fuser(run, tmp_path / "projector", {"pair": "tiny"}, [item.item_id for item in items])
    projector, manifest, ids = load_fuser(tmp_path / "projector", tiny.model.config, other_shape.model.config,
                                          kind="projector")
    assert manifest["kind"] == "projector" and ids == [item.item_id for item in items]
    with pytest.raises(CommError, match="expected a fuser, found a projector"):
        load_fuser(tmp_path / "projector", tiny.model.config, other_shape.model.config)
    harness = Harness(tiny, other_shape, comm_items("recall", 2, 0, facts=2), max_tokens=4, projector=projector,
                      progress=False)
    rows = harness.run(["kv:front:int8"], [300, None])
    assert {r["cap"] for r in rows} == {300, None}
    assert all(r["bytes"] <= 300 for r in rows if r["cap"] == 300)
    no_projector = Harness(tiny, other_shape, comm_items("recall", 1, 0, facts=2), progress=False)
    with pytest.raises(CommError, match="without a projector"):
        no_projector.run(["kv:front:int8"], [None])


def test_fig7_trains_a_projector_in_the_run_when_no_folder_is_given(tiny, other_shape):
    from ember.errors import ParamsError
    from ember.experiments.budget_curves import Params, trained_module

    params = Params(model="tiny-qwen2", fuser_steps=2, fuser_hidden=8, fuser_examples=4, facts=2)
    projector, info = trained_module(params, tiny, other_shape, "projector", False)
    assert isinstance(projector, Projector) and info["steps_done"] == 2
    assert all(i.startswith("recall-") for i in info["train_ids"])
    with pytest.raises(ParamsError, match="expected a projector folder or fuser_steps > 0"):
        trained_module(Params(model="tiny-qwen2"), tiny, other_shape, "projector", False)


@pytest.fixture(scope="module")
def other_family(tiny):
    """A sharer of another tokenizer (SmolLM2's real one) and cache shape: random weights over its vocabulary."""
    from ember.models import packages
    from ember.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(packages.ensure("smollm2-135m-instruct"))
    config = preset_config("tiny-llama", vocab_size=tokenizer.vocab_size, **WIDER)
    return Engine(random_model(config, torch.float32, torch.device("cpu"), 7), tokenizer, prefix_cache=False)


def test_context_transfer_across_tokenizers_sends_one_sharer_token_per_receiver_token(tiny, other_family):
    """The sharer reads the context aligned to the receiver's tokens: the projector trains on such batches, and
    the harness sends (and the receiver places) exactly the receiver's context tokens."""
    items = comm_items("recall", 2, 0, facts=2)
    batch = transfer_batch(items, tiny.tokenizer, other_family.tokenizer, "cpu")
    for row, item in enumerate(items):
        context = tiny.tokenizer.encode(item.context)
        assert int(batch.context_len[row]) == len(context)
        assert len(other_family.tokenizer.encode(item.context)) != len(context)  # the two tokenize it otherwise
    projector = Projector(tiny.model.config, other_family.model.config, hidden=8)
    harness = Harness(tiny, other_family, items, max_tokens=3, projector=projector, progress=False)
    rows = harness.run(["kv:front:fp16"], [None])
    for row, item in zip(rows, items):
        assert row["tokens_sent"] == len(tiny.tokenizer.encode(item.context))


def test_a_sharer_of_another_tokenizer_needs_a_projector_even_at_the_same_cache_shape(tiny, other_family):
    same_shape = Engine(random_model(preset_config("tiny-qwen2", vocab_size=other_family.tokenizer.vocab_size),
                                     torch.float32, torch.device("cpu"), 9), other_family.tokenizer, prefix_cache=False)
    harness = Harness(tiny, same_shape, comm_items("recall", 1, 0, facts=2), max_tokens=2, progress=False)
    with pytest.raises(CommError, match="one tokenizer on both sides"):
        harness.run(["kv:front:fp16"], [None])
