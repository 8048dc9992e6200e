"""LoRA slots against peft (the oracle): logits, greedy tokens, gradients; PEFT directories both ways; hot swap,
rollback and the exact base model; clear errors for what ember cannot apply."""

import json

import pytest
import torch
from padding import left_padded

from ember.engine import Engine, SamplingParams
from ember.errors import AdapterError
from ember.models import LoraAdapter, attach, load
from ember.models.lora import lora_modules

PROMPTS = ["The code for Alice is 4821. The code for Bob is", "Hi", "Once upon a time, in a land far away,",
           "def f(x):\n    return"]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _randomize(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    """Give B non-zero values (a fresh adapter is the identity) so the adapter changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in adapter.weights.values():
            b.copy_(0.3 * torch.randn(b.shape, generator=generator))
    return adapter


def _hf_with_peft(directory, adapter_dir, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable).eval()


def _assert_engine_matches_peft(loaded, engine, peft_model, prompts, new=32):
    result = engine.generate(prompts, sampling=SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    ids, mask, width = left_padded(loaded.tokenizer, prompts)
    with torch.no_grad():
        reference = peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                        min_new_tokens=new, eos_token_id=None,
                                        pad_token_id=loaded.tokenizer.pad_token_id)
        full_mask = torch.cat([mask, torch.ones(len(prompts), new, dtype=torch.long)], dim=1)
        logits = peft_model(input_ids=reference, attention_mask=full_mask,
                            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    for row, out in enumerate(result.outputs):
        assert out.completions[0].token_ids == reference[row, width:].tolist()
    ref = torch.log_softmax(logits.float(), -1)[:, width - 1:-1].gather(-1, reference[:, width:, None])[..., 0]
    ours = torch.tensor([out.completions[0].logprobs for out in result.outputs])
    return (ours - ref).abs().max().item()


def test_ember_adapter_matches_peft_and_opens_in_peft(family, tiny_dirs, tmp_path):
    """Saved by ember in PEFT format, applied by peft: unequal ranks, alpha != r, rsLoRA, module and layer
    subsets, against ember's slots through the engine."""
    loaded = load(str(tiny_dirs[family]))
    engine = Engine(loaded.model, loaded.tokenizer)
    narrow = _randomize(LoraAdapter.create(loaded.model, r=4, alpha=16, targets=("q_proj", "v_proj", "down_proj"),
                                           layers=[1], seed=1), 2)
    wide = _randomize(LoraAdapter.create(loaded.model, r=8, alpha=3, use_rslora=True, seed=3), 4)
    base = engine.generate(PROMPTS, sampling=GREEDY)
    for name, adapter in (("narrow", narrow), ("wide", wide)):
        adapter.save(tmp_path / name)
        engine.load_adapter(tmp_path / name, name)
        engine.set_adapter(name)
        diff = _assert_engine_matches_peft(loaded, engine, _hf_with_peft(tiny_dirs[family], tmp_path / name),
                                           PROMPTS)
        assert diff < 1e-4, f"{name}: logprobs differ from peft by {diff}"
    changed = engine.generate(PROMPTS, sampling=GREEDY)
    assert [o.completions[0].token_ids for o in changed.outputs] != [o.completions[0].token_ids for o in base.outputs]


def test_peft_made_adapter_with_rank_and_alpha_patterns_loads_in_ember(tiny_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    family = "tiny-qwen2"
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[family]), dtype=torch.float32)
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                        rank_pattern={"gate_proj": 2}, alpha_pattern={"o_proj": 5}, init_lora_weights=False)
    peft_model = get_peft_model(hf, config).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    loaded = load(str(tiny_dirs[family]))
    adapter = LoraAdapter.load(tmp_path / "peft", loaded.model)
    assert {a.shape[0] for n, (a, _) in adapter.weights.items() if n.endswith("gate_proj")} == {2}
    assert adapter.scales["model.layers.0.self_attn.o_proj"] == pytest.approx(5 / 6)
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.set_adapter(engine.load_adapter(tmp_path / "peft"))
    assert _assert_engine_matches_peft(loaded, engine, peft_model, PROMPTS) < 1e-4


def test_lora_gradients_match_peft_and_finite_differences(tiny_dirs, tmp_path):
    family = "tiny-llama"
    loaded = load(str(tiny_dirs[family]))
    adapter = _randomize(LoraAdapter.create(loaded.model, r=4, alpha=8, targets=("q_proj", "up_proj"), seed=5), 6)
    adapter.save(tmp_path / "a")
    ids, mask, _ = left_padded(loaded.tokenizer, PROMPTS[:3])
    labels = ids.roll(-1, dims=1)
    scored = mask[:, :-1] * mask[:, 1:]  # real token predicting a real token

    def loss_of(logits):
        logprobs = torch.log_softmax(logits.double(), -1)[:, :-1]
        return -(logprobs.gather(-1, labels[:, :-1, None])[..., 0] * scored).sum() / scored.sum()

    attach(loaded.model, adapter)
    try:
        loss = loss_of(loaded.model(ids, mask.bool()))
        loss.backward()
        name = "model.layers.1.self_attn.q_proj"
        grad_a, grad_b = (t.grad.clone() for t in adapter.weights[name])
        peft_model = _hf_with_peft(tiny_dirs[family], tmp_path / "a", trainable=True)
        peft_loss = loss_of(peft_model(input_ids=ids, attention_mask=mask,
                                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits)
        peft_loss.backward()
        peft_q = dict(peft_model.named_modules())[f"base_model.model.{name}"]
        torch.testing.assert_close(loss, peft_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_a, peft_q.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad_b, peft_q.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)
        # central finite difference along the gradient direction of B (fp64 copy of the model)
        model64 = loaded.model.double()
        adapter64 = adapter.to(dtype=torch.float64)
        attach(model64, adapter64)
        b64 = adapter64.weights[name][1]
        direction = grad_b.double() / grad_b.norm()
        eps = 1e-4
        with torch.no_grad():
            b64 += eps * direction
            up = loss_of(model64(ids, mask.bool()))
            b64 -= 2 * eps * direction
            down = loss_of(model64(ids, mask.bool()))
            b64 += eps * direction
        numeric = (up - down) / (2 * eps)
        assert numeric.item() == pytest.approx(grad_b.norm().item(), rel=1e-4)
    finally:
        attach(loaded.model.float(), None)


def test_gradient_checkpointing_gives_the_same_gradients():
    loaded = load("tiny-qwen3")
    adapter = _randomize(LoraAdapter.create(loaded.model, r=4, alpha=4, seed=0), 1)
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[0])])
    grads, calls = [], []
    hook = loaded.model.model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    attach(loaded.model, adapter)
    try:
        for checkpointing in (False, True):
            loaded.model.gradient_checkpointing = checkpointing
            calls.clear()
            loaded.model(ids).logsumexp(-1).mean().backward()
            grads.append([t.grad.clone() for t in adapter.parameters()])
            grads[-1].append(len(calls))
            for t in adapter.parameters():
                t.grad = None
    finally:
        hook.remove()
        loaded.model.gradient_checkpointing = False
        attach(loaded.model, None)
    assert grads[0].pop() == 1 and grads[1].pop() == 2  # with checkpointing the layer ran again in backward
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=1e-5)


def test_swap_rollback_and_exact_base():
    loaded = load("tiny-qwen2")
    engine = Engine(loaded.model, loaded.tokenizer, prefix_cache=False)  # bitwise: every prompt computed alike
    base_logits = loaded.model(torch.tensor([loaded.tokenizer.encode(PROMPTS[0])])).detach()
    base = engine.generate(PROMPTS, sampling=GREEDY)
    first = _randomize(LoraAdapter.create(loaded.model, r=2, alpha=4, targets=("v_proj",), seed=1), 1)
    second = _randomize(LoraAdapter.create(loaded.model, r=8, alpha=8, seed=2), 2)  # larger: slots grow
    engine.set_adapter(engine.load_adapter(first, "first"))
    alone = engine.generate(PROMPTS, sampling=GREEDY)
    engine.load_adapter(second, "second")  # the slots grow to hold both; `first` is zero-padded in them
    with_first = engine.generate(PROMPTS, sampling=GREEDY)
    engine.set_adapter("second")
    with_second = engine.generate(PROMPTS, sampling=GREEDY)
    engine.set_adapter("first")  # rollback: one call
    again = engine.generate(PROMPTS, sampling=GREEDY)
    engine.set_adapter(None)
    back = engine.generate(PROMPTS, sampling=GREEDY)
    tokens = lambda r: [o.completions[0].token_ids for o in r.outputs]  # noqa: E731
    logprobs = lambda r: [o.completions[0].logprobs for o in r.outputs]  # noqa: E731
    assert tokens(with_first) == tokens(alone)
    assert max(abs(x - y) for a, b in zip(logprobs(with_first), logprobs(alone)) for x, y in zip(a, b)) < 1e-5
    assert tokens(again) == tokens(with_first) and logprobs(again) == logprobs(with_first)
    assert tokens(back) == tokens(base) and logprobs(back) == logprobs(base)
    assert tokens(with_second) != tokens(base)
    assert torch.equal(loaded.model(torch.tensor([loaded.tokenizer.encode(PROMPTS[0])])), base_logits)
    assert all(m.lora_a is None for m in lora_modules(loaded.model).values())
    assert engine.adapters == ["first", "second"]
    with pytest.raises(AdapterError, match="resident adapters"):
        engine.set_adapter("third")


def test_slot_reference_equals_attached_adapter(family):
    """The in-place slots (scale folded into B, zero-padded ranks) against the adapter attached by reference."""
    loaded = load(family)
    small = _randomize(LoraAdapter.create(loaded.model, r=2, alpha=7, targets=("k_proj", "o_proj"), seed=1), 3)
    big = _randomize(LoraAdapter.create(loaded.model, r=6, alpha=2, seed=2), 4)
    engine = Engine(loaded.model, loaded.tokenizer)
    engine.load_adapter(big, "big")  # slots sized for the larger adapter: `small` is zero-padded
    engine.set_adapter(engine.load_adapter(small, "small"))
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        slotted = loaded.model(ids)
        engine.set_adapter(None)
        attach(loaded.model, small)
        attached = loaded.model(ids)
        attach(loaded.model, None)
    torch.testing.assert_close(slotted, attached, atol=1e-5, rtol=1e-5)


def _write_adapter(tmp_path, change=None, drop=None):
    loaded = load("tiny-llama")
    path = LoraAdapter.create(loaded.model, r=2, alpha=2, targets=("q_proj",), seed=0).save(tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(change or {})
    (path / "adapter_config.json").write_text(json.dumps(config))
    if drop:
        (path / drop).unlink()
    return loaded, path


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "use_dora = True is not supported"),
    ({"bias": "all"}, "bias = 'all' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "peft_type = 'IA3'"),
    ({"target_modules": ["q_proj", "lm_head"]}, "target_modules \\['lm_head'\\]"),
    ({"r": 0}, "r: expected an integer >= 1"),
    ({"rank_pattern": {"q_proj": 3}}, "rank: expected 3 from the config, found 2"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens = \\[5, 6\\] is not supported"),
    ({"use_qalora": True}, "use_qalora"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights = 'pissa' is not supported .*rewrites the base weights"),
])
def test_unsupported_adapter_configs_name_the_field(tmp_path, change, message):
    _, path = _write_adapter(tmp_path, change)
    with pytest.raises(AdapterError, match=message):
        LoraAdapter.load(path)


def test_bad_adapter_directories_and_shapes(tmp_path):
    loaded, path = _write_adapter(tmp_path, drop="adapter_model.safetensors")
    with pytest.raises(AdapterError, match="expected adapter_config.json and adapter_model.safetensors"):
        LoraAdapter.load(path)
    (path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(AdapterError, match="cannot be read"):
        LoraAdapter.load(path)
    from ember.models.loader import random_model
    from ember.models.presets import preset_config

    wider = random_model(preset_config("tiny-llama", hidden_size=32, num_heads=2, num_kv_heads=1),
                         torch.float32, torch.device("cpu"), 0)
    adapter = LoraAdapter.create(wider, r=2, alpha=2, targets=("q_proj",))
    engine = Engine(loaded.model, loaded.tokenizer)
    with pytest.raises(AdapterError, match="expected A \\(r, 64\\)"):
        engine.load_adapter(adapter)
    deeper = random_model(preset_config("tiny-llama", num_layers=4), torch.float32, torch.device("cpu"), 0)
    with pytest.raises(AdapterError, match="model.layers.3.self_attn.q_proj: expected one of"):
        engine.load_adapter(LoraAdapter.create(deeper, r=2, alpha=2, targets=("q_proj",), layers=[3]))
    assert engine.adapters == []  # nothing half-loaded


def test_real_smollm2_with_an_adapter_matches_peft(tmp_path, package_model):
    """SmolLM2-135M real weights (fp32 compute) with an adapter of unequal per-module ranks and alpha != r on a
    subset of modules and layers, against transformers + peft on the same directory."""
    name = "smollm2-135m-instruct"
    directory = package_model(name)
    loaded = load(name, dtype="float32")
    adapter = LoraAdapter.create(loaded.model, r=8, alpha=32, targets=("q_proj", "v_proj", "o_proj", "up_proj"),
                                 layers=list(range(4, 30, 3)), seed=7)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for module, (a, b) in adapter.weights.items():
            if module.endswith("o_proj"):  # unequal ranks: o_proj keeps 3 of the 8
                adapter.weights[module] = (a[:3].clone(), b[:, :3].clone())
                b = adapter.weights[module][1]
            b.copy_(0.02 * torch.randn(b.shape, generator=generator))
    adapter.save(tmp_path / "a")
    engine = Engine(loaded.model, loaded.tokenizer, prefix_cache=False)
    prompts = [loaded.tokenizer.apply_chat_template([{"role": "user", "content": c}])
               for c in ("The code for Alice is 4821. What is Alice's code?", "Name a colour.")]
    base = engine.generate(prompts, sampling=GREEDY).outputs[0].completions[0]
    engine.set_adapter(engine.load_adapter(tmp_path / "a"))
    adapted = engine.generate(prompts, sampling=GREEDY).outputs[0].completions[0]
    moved = max(abs(x - y) for x, y in zip(adapted.logprobs, base.logprobs))
    assert adapted.token_ids != base.token_ids or moved > 0.01  # the adapter really changes the model
    diff = _assert_engine_matches_peft(loaded, engine, _hf_with_peft(directory, tmp_path / "a"),
                                       prompts)
    assert diff < 1e-4, f"chosen-token logprobs differ from peft by {diff}"


def test_engines_sharing_one_model_each_serve_their_own_weights():
    """Engines over one model with different adapter layouts, and one without adapters, each run exactly what
    its own `versions` describe, whatever the others (or an `attach`) left in the slots."""
    loaded = load("tiny-llama")
    narrow = _randomize(LoraAdapter.create(loaded.model, r=2, alpha=4, targets=("q_proj",), seed=1), 1)
    wide = _randomize(LoraAdapter.create(loaded.model, r=4, alpha=4, seed=2), 2)
    engines = [Engine(loaded.model, loaded.tokenizer, prefix_cache=False) for _ in range(3)]
    for engine, adapter in zip(engines, (narrow, wide)):  # the third engine never loads an adapter
        engine.set_adapter(engine.load_adapter(adapter))
    references = []
    for adapter in (narrow, wide, None):  # each on its own copy of the model
        twin = load("tiny-llama")
        reference = Engine(twin.model, twin.tokenizer, prefix_cache=False)
        if adapter is not None:
            reference.set_adapter(reference.load_adapter(adapter))
        references.append(reference.generate(PROMPTS, sampling=GREEDY))
    tokens = lambda r: [o.completions[0].token_ids for o in r.outputs]  # noqa: E731
    attach(loaded.model, wide)  # a trainer's attach must not leak into generation either
    for _ in range(2):  # alternate: each call must run its own engine's weights
        for engine, reference in zip(engines, references):
            assert tokens(engine.generate(PROMPTS, sampling=GREEDY)) == tokens(reference)
    assert tokens(references[0]) != tokens(references[2]) != tokens(references[1])
    q = lora_modules(loaded.model)["model.layers.0.self_attn.q_proj"]
    assert q.lora_a is wide.weights["model.layers.0.self_attn.q_proj"][0]  # the trainer's attach was given back


def test_default_adapter_names_never_overwrite_a_resident_one():
    loaded = load("tiny-llama")
    engine = Engine(loaded.model, loaded.tokenizer)
    made = [engine.load_adapter(LoraAdapter.create(loaded.model, r=2, alpha=2, seed=s)) for s in range(2)]
    engine.remove_adapter(made[0])
    third = engine.load_adapter(LoraAdapter.create(loaded.model, r=2, alpha=2, seed=3))
    assert made == ["adapter-0", "adapter-1"] and third == "adapter-0" and sorted(engine.adapters) == made


def test_a_resident_adapter_is_a_copy_of_its_source():
    """Regression: on the same device and dtype the engine's resident adapter aliased the source tensors, so a
    trainer's optimizer step silently changed what the engine believed it held (and its low-rank deltas)."""
    loaded = load("tiny-llama")
    engine = Engine(loaded.model, loaded.tokenizer)
    adapter = LoraAdapter.create(loaded.model, r=2, alpha=4)
    name = engine.load_adapter(adapter)
    with torch.no_grad():
        for _, b in adapter.weights.values():
            b.add_(1.0)
    assert all(not torch.equal(engine.adapter(name).weights[n][1], b) for n, (_, b) in adapter.weights.items())
