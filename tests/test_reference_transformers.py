"""ember's decoder and generate against transformers, per family, fp32 on CPU."""

import torch
from padding import left_padded

from ember.engine import Engine, SamplingParams
from ember.models import load

PROMPTS = ["The code for Alice is 4821. The code for Bob is", "Hi", "Once upon a time, in a land far away,",
           "def f(x):\n    return"]


def test_logits_match_transformers_on_padded_batch(family, tiny_dirs, hf_models):
    loaded = load(str(tiny_dirs[family]))
    ids, mask, _ = left_padded(loaded.tokenizer, PROMPTS)
    ours = loaded.model(ids, mask.bool())
    with torch.no_grad():
        ref = hf_models[family](input_ids=ids, attention_mask=mask,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)


def test_greedy_tokens_and_logprobs_match_transformers(family, tiny_dirs, hf_models):
    loaded = load(str(tiny_dirs[family]))
    hf = hf_models[family]
    new = 40
    result = Engine(loaded.model, loaded.tokenizer).generate(
        PROMPTS, sampling=SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    ids, mask, width = left_padded(loaded.tokenizer, PROMPTS)
    with torch.no_grad():
        reference = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                min_new_tokens=new, eos_token_id=None, pad_token_id=loaded.tokenizer.pad_token_id)
    for row, out in enumerate(result.outputs):
        ours = out.completions[0]
        assert len(ours.token_ids) == new >= 32
        assert ours.token_ids == reference[row, width:].tolist()
    # chosen-token logprobs against transformers' log-softmax over the whole generated sequences
    full_mask = torch.cat([mask, torch.ones(len(PROMPTS), new, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = hf(input_ids=reference, attention_mask=full_mask,
                    position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    ref_logprobs = torch.log_softmax(logits.float(), -1)[:, width - 1:-1].gather(-1, reference[:, width:, None])[..., 0]
    ours = torch.tensor([out.completions[0].logprobs for out in result.outputs])
    assert (ours - ref_logprobs).abs().max().item() < 1e-4
