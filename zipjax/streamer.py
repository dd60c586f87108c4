"""Token ids in, text out in whole characters: the detokenizer of a stream.

    streamer = TextStreamer(model.tokenizer)
    for step in zipjax.generate_stream(model, [ids], 64):
        print(streamer.push(int(step[0])), end="", flush=True)
    print(streamer.flush())

Decoding one id at a time breaks text: a byte-level BPE spells a multi-byte character (é, 日, an emoji) over several
tokens, and SentencePiece tokenizers drop a word's leading space when a token is decoded alone. The streamer keeps
a short window of ids and decodes it twice, as vLLM's incremental detokenizer does: the window up to the text already
given out, and the window with the new ids; the difference is the new text. While the new text ends in an incomplete
character (U+FFFD) it is held back until a later token completes it. Each step decodes a few ids, not the whole
sequence, so a stream costs linear time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextStreamer:
    """Feed ids with `push`; each call returns the text they completed ("" while a character is incomplete)."""

    def __init__(self, tokenizer: Decoder):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are settled text
        self._read = 0  # ids before it have been given out as text

    def push(self, token: int) -> str:
        self._ids.append(int(token))
        given = self._tokenizer.decode(self._ids[self._prefix:self._read])
        text = self._tokenizer.decode(self._ids[self._prefix:])
        if len(text) <= len(given) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(given):]

    def flush(self) -> str:
        """What the last ids hold that is not yet given out (an incomplete character comes out as U+FFFD)."""
        given = self._tokenizer.decode(self._ids[self._prefix:self._read])
        text = self._tokenizer.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(given):]


def stream_text(tokenizer: Decoder, tokens: Iterable[int]) -> Iterator[str]:
    """The text pieces of an iterable of token ids, whole characters each, the remainder last."""
    streamer = TextStreamer(tokenizer)
    for token in tokens:
        piece = streamer.push(token)
        if piece:
            yield piece
    rest = streamer.flush()
    if rest:
        yield rest
