"""The text streamer gives out whole characters and, joined, exactly the text of decoding every id at once."""

from pathlib import Path

import pytest

from zipjax.streamer import TextStreamer, stream_text
from zipjax.tokenizer import Tokenizer

STDLIB = Path(__file__).resolve().parents[1] / "checkpoints" / "stdlib-llama"
TEXTS = ["def f(x):\n    return x  # plain ASCII",
         "naïve café — déjà vu, 日本語のテキスト, emoji 🎉🚀 and math ∑∫",
         "  leading spaces\tand\ttabs\n\n\nnewlines"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(STDLIB)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_are_whole_characters_and_join_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 1


def test_an_incomplete_character_is_held_back_then_completed(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE spells the emoji over several tokens
    streamer = TextStreamer(tokenizer)
    out = [streamer.push(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "🎉"
    assert streamer.flush() == ""
    streamer.push(ids[0])
    assert streamer.flush() == "\ufffd"  # the stream ended inside a character: said, not dropped
