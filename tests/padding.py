"""Left-padded batches of prompts as transformers takes them (ids, attention mask) for reference runs."""

import torch


def left_padded(tokenizer, prompts):
    """(ids (b, W), mask (b, W), W) of the encoded prompts, left-padded with the tokenizer's pad id."""
    encoded = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask, width
