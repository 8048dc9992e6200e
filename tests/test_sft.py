"""The in-process LoRA SFT step: its loss against a per-token reference, that it learns, that it touches only the
adapter, saved adapters reopen identically, and bad batches are clear errors."""

import pytest
import torch
import torch.nn.functional as F

from ember.errors import TrainError
from ember.models import LoraAdapter, load
from ember.models.versions import model_fingerprint
from ember.train import Example, TrainConfig, SFTTrainer, answer_nll


def _examples(tokenizer):
    pairs = [("Name of the cat? ", "Tom"), ("Capital of Peru: ", "Lima."), ("2+2=", "4")]
    return [Example.from_text(tokenizer, p, a) for p, a in pairs]


def _reference_nll(model, example):
    """Per token, unpadded: -log p(answer token | everything before it)."""
    ids = torch.tensor([example.prompt + example.answer])
    logits = model(ids)[0]  # (T, V)
    total = 0.0
    for offset in range(len(example.answer)):
        position = len(example.prompt) + offset
        total -= F.log_softmax(logits[position - 1].double(), dim=-1)[ids[0, position]].item()
    return total


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen3"])
def test_answer_nll_matches_a_per_token_reference(family):
    loaded = load(family)
    examples = _examples(loaded.tokenizer)
    nll, counts = answer_nll(loaded.model, examples)
    for value, count, example in zip(nll.tolist(), counts.tolist(), examples):
        assert value == pytest.approx(_reference_nll(loaded.model, example), abs=1e-4)
        assert count == len(example.answer)


def test_sft_learns_and_touches_only_the_adapter(tmp_path):
    loaded = load("tiny-llama")
    model, examples = loaded.model, _examples(loaded.tokenizer)
    before = model_fingerprint(model)
    trainer = SFTTrainer(model, TrainConfig(rank=4, alpha=8, lr=3e-2, layers=(1,)))
    losses = [trainer.step(examples)["loss"] for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0]
    assert model_fingerprint(model) == before and trainer.adapter.layers == [1]
    assert all(m.lora_a is None for m in model.modules() if hasattr(m, "lora_a"))  # binding given back
    path = trainer.save(tmp_path / "step-8")
    reopened = LoraAdapter.load(path, model)
    for name, (a, b) in trainer.adapter.weights.items():
        assert torch.equal(reopened.weights[name][0], a.detach()) and torch.equal(reopened.weights[name][1], b.detach())


def test_bad_sft_batches_are_clear_errors():
    loaded = load("tiny-llama")
    trainer = SFTTrainer(loaded.model, TrainConfig(rank=2))
    with pytest.raises(TrainError, match="non-empty prompt and answer"):
        trainer.step([Example([5, 6], [])])
    with pytest.raises(TrainError, match="found none"):
        trainer.step([])
