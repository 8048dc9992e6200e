"""A candidate's text while it is generated: incremental decoding and stop-string matching.

Decoding the whole completion at every step costs O(T^2) host time over a generation. `IncrementalText` decodes
only a bounded window of recent tokens instead. A byte-level BPE token may end inside a multi-byte character,
which decodes to a trailing U+FFFD that a later token completes: such text is held back until the character is
whole, so confirmed text never changes afterwards and equals a full decode. `StopText` searches only the newly
confirmed text for stop strings and releases (for streaming) only text that no later token can cut.
"""

from __future__ import annotations

from ember.errors import GenerationError

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to
MAX_PENDING = 8  # tokens to wait for a character to complete (UTF-8 needs at most 4 bytes) before cutting the run


class IncrementalText:
    """The decoded text of a growing token list. Each push decodes the tokens since the last confirmed point,
    with the window before it as context (so tokenizers that treat a leading token specially decode it alike):
    at most 10 * MAX_PENDING tokens a step (3 while tokens end on whole characters), whatever the length so
    far. `decoded_tokens` counts that work."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""  # confirmed text: the decode of tokens[:_read]
        self._prefix = 0  # tokens[_prefix:_read] is the context window, already part of `text`
        self._read = 0
        self.decoded_tokens = 0

    def push(self, token: int) -> str:
        """Append a token; returns the text it confirmed ('' while a character is still incomplete)."""
        self.tokens.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Confirm the pending tokens as they decode now (at the end: an incomplete character stays U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        end = len(self.tokens)
        if self._read == end:
            return ""
        window = self._decode(self._prefix, end)
        pending = end - self._read
        if window.endswith(REPLACEMENT) and not final and pending < 2 * MAX_PENDING:
            if pending < MAX_PENDING:
                return ""
            # a long run ending mid-character (invalid bytes): confirm all but the last token if that token
            # decodes the same on its own, i.e. starts afresh; after 2 * MAX_PENDING tokens, confirm all
            head, last = self._decode(self._prefix, end - 1), self._decode(end - 1, end)
            if not last or head + last != window:
                return ""
            end, window = end - 1, head
        delta = window[len(self._decode(self._prefix, self._read)):]
        self.text += delta
        self._prefix, self._read = self._read, end
        return delta

    def _decode(self, begin: int, end: int) -> str:
        self.decoded_tokens += end - begin
        return self.tokenizer.decode(self.tokens[begin:end]) if end > begin else ""


class StopText:
    """A candidate's text cut at its first stop string, found by searching only newly confirmed text."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.decoder = IncrementalText(tokenizer)
        self.stops = stops
        self._longest = max(map(len, stops), default=0)
        self._searched = 0  # length of confirmed text already searched (or passed over before min_tokens)
        self._released = 0  # characters of `text` handed out by `release`
        self.cut: int | None = None  # where the first stop string begins, once one completed

    def push(self, token: int, search: bool = True) -> bool:
        """Append a token; True when a stop string has completed. With `search` False (before min_tokens) the new
        text is passed over: a stop string counts only when it completes after that."""
        self.decoder.push(token)
        text = self.decoder.text
        if search and self.stops and self.cut is None:
            begin = max(0, self._searched - self._longest + 1)
            hits = []
            for stop in self.stops:  # the first occurrence that completes in the new text (not one passed over)
                i = text.find(stop, begin)
                while i >= 0 and i + len(stop) <= self._searched:
                    i = text.find(stop, i + 1)
                if i >= 0:
                    hits.append(i)
            if hits:
                self.cut = min(hits)
        self._searched = len(text)
        return self.cut is not None

    @property
    def text(self) -> str:
        """The confirmed text, ending before the stop string once one was found."""
        return self.decoder.text if self.cut is None else self.decoder.text[:self.cut]

    def release(self, final: bool = False) -> str:
        """Text not released before that no later token can change: held back are an incomplete character and a
        tail that may still become a stop string. `final` (the candidate finished) releases the rest."""
        if final and self.cut is None:
            self.decoder.flush()
        text = self.text
        end = len(text) if final or self.cut is not None else len(text) - _partial_stop(text, self.stops)
        delta = text[self._released:end]
        self._released = max(self._released, end)
        return delta


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


def special_stop_ids(stops: tuple[str, ...], tokenizer) -> frozenset[int]:
    """Ids of the special tokens whose text is exactly a stop string. Decoding skips special tokens, so their
    text never appears to match: such a stop string matches the token id instead. A stop string holding a special
    token's text among other text could never match and is refused."""
    specials = tokenizer.special_tokens
    for stop in stops:
        inside = [token for token in specials if token in stop and token != stop]
        if inside:
            raise GenerationError(f"SamplingParams.stop: expected plain text or exactly one special token, found "
                                  f"{stop!r}, which contains the special token {inside[0]!r} (decoding skips it, so "
                                  f"the text never shows it); give {inside[0]!r} as a stop string of its own")
    return frozenset(specials[stop] for stop in stops if stop in specials)
