"""Tokenizers behind one small interface: encode / decode / special ids.

`CharTokenizer` is the self-contained tokenizer of the tiny test presets (printable ASCII, one token per
character, so decoding any prefix of tokens gives a prefix of the text). `HFTokenizer` wraps a Hugging Face
tokenizer found in a model directory.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from ember.errors import ModelLoadError

CHAR_TOKENIZER_FILE = "ember_tokenizer.json"


class CharTokenizer:
    """Character-level tokenizer over printable ASCII plus <pad>, <bos>, <eos>, <unk>."""

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

    def __init__(self):
        self.alphabet = string.printable  # 100 characters, includes whitespace
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id = range(4)
        self._index = {ch: i + len(self.SPECIALS) for i, ch in enumerate(self.alphabet)}
        self.eos_token_ids = (self.eos_token_id,)

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(ch, self.unk_token_id) for ch in text]

    def decode(self, ids) -> str:
        offset = len(self.SPECIALS)
        return "".join(self.alphabet[i - offset] for i in ids if offset <= i < self.vocab_size)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the special tokens, which `decode` skips."""
        return {text: i for i, text in enumerate(self.SPECIALS)}

    def save(self, directory: Path) -> None:
        (Path(directory) / CHAR_TOKENIZER_FILE).write_text(json.dumps({"type": "char", "alphabet": self.alphabet}))


class HFTokenizer:
    """A Hugging Face tokenizer with the ember interface (no special tokens added on encode)."""

    def __init__(self, tokenizer, extra_eos: tuple[int, ...] = ()):
        self.hf = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        ids = ([] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]) + list(extra_eos)
        self.eos_token_ids = tuple(dict.fromkeys(ids))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of the special tokens, which `decode` skips."""
        return {token.content: i for i, token in self.hf.added_tokens_decoder.items() if token.special}

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Render chat messages with the model's template, ready for generation."""
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def save(self, directory: Path) -> None:
        self.hf.save_pretrained(str(directory))


def load_tokenizer(directory: Path, extra_eos: tuple[int, ...] = ()):
    """The tokenizer stored in a model directory: ember's char tokenizer or a Hugging Face one."""
    directory = Path(directory)
    if (directory / CHAR_TOKENIZER_FILE).exists():
        return CharTokenizer()
    if (directory / "tokenizer.json").exists() or (directory / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(directory)), extra_eos)
    raise ModelLoadError(
        f"tokenizer: expected tokenizer.json, tokenizer_config.json or {CHAR_TOKENIZER_FILE} in {directory}, found none"
    )
