"""The shipped byte-level tokenizer: exact round trips, special ids, no download."""

import pytest

from echo_exec.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer


def test_round_trip_unicode_and_code():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # carré, 平方, 🐍\n\ttab"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_special_ids_and_vocab():
    tok = ByteTokenizer()
    assert (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE) == (256, 257, 258, 259)
    ids = tok.encode("ab", add_bos=True, add_eos=True)
    assert ids == [BOS_ID, 97, 98, EOS_ID]
    assert tok.decode(ids + [PAD_ID]) == "ab"


def test_partial_character_and_bad_ids():
    tok = ByteTokenizer()
    snake = tok.encode("🐍")
    assert tok.decode_bytes(snake[:2]) == "🐍".encode()[:2]
    assert tok.decode(snake[:2]) == "\ufffd"
    with pytest.raises(ValueError):
        tok.decode([VOCAB_SIZE])
