"""A small byte-level BPE tokenizer built locally (no download), so CI always exercises byte-level decoding:
its vocabulary is the 256 byte symbols plus a few merges, so CJK characters and emoji span several tokens."""

from functools import lru_cache

CORPUS = 20 * ["hello world, hello 世界 done", "emoji 😀 and 🎉 party",
               "the quick brown fox jumps over the lazy dog"]


@lru_cache(maxsize=1)
def byte_level_bpe():
    """An ember HFTokenizer over a 300-token byte-level BPE with special tokens <|endoftext|> (eos), <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ember.models.tokenizer import HFTokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>"))
