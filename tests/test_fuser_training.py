"""Fuser training with both models frozen: the loss against the plain forward, generation after a fused
cache, resumable runs, export and load, and the split between training and evaluation ids."""

import json

import pytest
import torch

from ember.comm.data import TRAIN_SEED_BASE, check_disjoint, eval_examples, training_examples
from ember.comm.fusion import FusionExample, engine_pasts, fused_past, fusion_batch, fusion_loss, last_tokens
from ember.comm.train_fuser import FuserConfig, export_fuser, load_fuser, train_fuser
from ember.engine import Engine, SamplingParams
from ember.errors import CommError
from ember.models.presets import preset_config
from ember.train.tokens import Example, answer_nll

EXAMPLES = [FusionExample("a", ({"role": "user", "content": "The code for Bob is 1234."},), "1234"),
            FusionExample("b", ({"role": "user", "content": "What is two plus two?"},), "four, I think"),
            FusionExample("c", ({"role": "user", "content": "Say yes."},), "yes")]


@pytest.fixture(scope="module")
def pair():
    return (Engine.load("tiny-qwen2", seed=1, prefix_cache=False),
            Engine.load("tiny-llama", seed=2, prefix_cache=False))


def _closed(fuser):
    with torch.no_grad():
        fuser.gate_logits.fill_(-5.0)
    return fuser.eval()


def test_closed_gates_give_the_receivers_own_answer_loss(pair):
    receiver, sharer = pair
    fuser = _closed(train_fuser(receiver, sharer, EXAMPLES, FuserConfig(hidden=8, steps=1, batch=3)).module)
    for path in fuser.paths[0]:
        torch.nn.init.normal_(path.project.weight)  # a closed gate must hide even a non-zero projection
    batch = fusion_batch(EXAMPLES, receiver.tokenizer, sharer.tokenizer, "cpu")
    with torch.no_grad():
        loss = fusion_loss(receiver.model, sharer.model, fuser, batch)
        reference = [Example(batch.receiver_ids[i][batch.receiver_valid[i]].tolist(),
                             batch.answer_ids[i][batch.answer_valid[i]].tolist()) for i in range(3)]
        nll, count = answer_nll(receiver.model, reference)
    assert loss.item() == pytest.approx((nll.sum() / count.sum()).item(), rel=1e-5)


def test_generation_after_a_closed_fuser_is_plain_generation(pair):
    receiver, sharer = pair
    fuser = _closed(train_fuser(receiver, sharer, EXAMPLES, FuserConfig(hidden=8, steps=1, batch=3)).module)
    batch = fusion_batch([FusionExample(e.item_id, e.messages) for e in EXAMPLES], receiver.tokenizer,
                         sharer.tokenizer, "cpu")
    with torch.no_grad():
        fused, valid = fused_past(receiver.model, sharer.model, fuser, batch)
    sampling = SamplingParams(temperature=0, max_tokens=4, logprobs=3)
    got = receiver.generate(last_tokens(batch), sampling=sampling, past=engine_pasts(fused, valid, receiver.dtype))
    prompts = [batch.receiver_ids[i][batch.receiver_valid[i]].tolist() for i in range(3)]
    want = receiver.generate(prompts, sampling=sampling)
    for a, b in zip(got.outputs, want.outputs):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        assert list(a.completions[0].top_logprobs[0]) == list(b.completions[0].top_logprobs[0])


def test_training_lowers_the_loss_and_touches_neither_model(pair):
    receiver, sharer = pair
    before = {k: v.clone() for k, v in receiver.model.state_dict().items()}
    run = train_fuser(receiver, sharer, EXAMPLES, FuserConfig(hidden=16, steps=30, batch=3, lr=3e-3, warmup_steps=2))
    losses = [h["loss"] for h in run.history]
    assert run.finished and len(losses) == 30 and losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in receiver.model.state_dict().items())


def test_a_stopped_run_resumes_to_the_uninterrupted_fuser(pair, tmp_path):
    receiver, sharer = pair
    config = FuserConfig(hidden=8, steps=4, batch=2, checkpoint_every=1)
    whole = train_fuser(receiver, sharer, EXAMPLES, config)
    part = train_fuser(receiver, sharer, EXAMPLES, config, folder=tmp_path, time_budget_s=1e-9)
    assert not part.finished and len(part.history) == 1
    resumed = train_fuser(receiver, sharer, EXAMPLES, config, folder=tmp_path)
    assert resumed.finished and [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in whole.history], rel=1e-6)
    for key, value in whole.module.state_dict().items():
        assert torch.allclose(resumed.module.state_dict()[key], value, atol=1e-6), key
    with pytest.raises(CommError, match="made by another run"):
        train_fuser(receiver, sharer, EXAMPLES, FuserConfig(hidden=8, steps=5, batch=2), folder=tmp_path)


def test_export_and_load_round_trip(pair, tmp_path):
    receiver, sharer = pair
    run = train_fuser(receiver, sharer, EXAMPLES, FuserConfig(hidden=8, steps=2, batch=3))
    export_fuser(run, tmp_path / "fuser", {"pair": "tiny"}, [e.item_id for e in EXAMPLES])
    fuser, manifest, ids = load_fuser(tmp_path / "fuser", receiver.model.config, sharer.model.config)
    assert ids == ["a", "b", "c"] and manifest["steps_done"] == 2 and manifest["pair"] == "tiny"
    assert json.loads((tmp_path / "fuser" / "manifest.json").read_text())["hidden"] == 8
    for key, value in run.module.state_dict().items():
        assert torch.equal(fuser.state_dict()[key].cpu(), value.cpu())
    with pytest.raises(CommError, match="not fit this pair"):
        load_fuser(tmp_path / "fuser", receiver.model.config, preset_config("tiny-llama", num_layers=3))
    with pytest.raises(CommError, match="expected fuser.safetensors"):
        load_fuser(tmp_path / "nothing", receiver.model.config, sharer.model.config)


def test_bad_training_input_is_refused(pair):
    receiver, sharer = pair
    with pytest.raises(CommError, match="have answers"):
        train_fuser(receiver, sharer, [FusionExample("x", EXAMPLES[0].messages)], FuserConfig(steps=1))
    with pytest.raises(CommError, match="FuserConfig.steps"):
        FuserConfig(steps=0)


def test_recall_training_and_evaluation_ids_never_overlap():
    train = training_examples(50, seed=0, recall_share=1.0)
    evaluation, _ = eval_examples("recall", 200, seed=0)
    assert all(int(e.item_id.split(":")[1]) >= TRAIN_SEED_BASE for e in train)
    check_disjoint([e.item_id for e in train], [e.item_id for e in evaluation])
    with pytest.raises(CommError, match="trained on"):
        check_disjoint(["recall:5"], ["recall:5", "recall:6"])
    with pytest.raises(CommError, match="below"):
        eval_examples("recall", 10, seed=TRAIN_SEED_BASE - 5)


def test_benchmark_training_and_evaluation_ids_never_overlap():
    from ember.tasks import datasets

    if not datasets.is_ready():
        pytest.skip("benchmark sets not extracted (run `make models`)")
    train = {e.item_id for e in training_examples(2000, seed=0)}
    for task in ("openbookqa", "arc_challenge"):
        evaluation, items = eval_examples(task, 300)
        check_disjoint(train, [e.item_id for e in evaluation])
        assert len(items) == len(evaluation)
    assert any(i.startswith("mmlu:") for i in train) and any(i.startswith("arc_easy:") for i in train)
