"""The shipped byte-level tokenizer: exact round trips, special ids, no download."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echo_exec.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    ByteTokenizer,
    hf_tokenizer_files,
    write_hf_tokenizer,
)


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


# --- the Hugging Face form (tokenizer.json), read by transformers and by HF-compatible servers such as SGLang ---

SHIPPED = Path(__file__).resolve().parents[1] / "echo_exec" / "models"


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SHIPPED / "tiny-target")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=200).filter(lambda s: "<|echo_" not in s))
def test_hf_tokenizer_reads_text_as_the_byte_tokenizer(hf_tok, text):
    ids = ByteTokenizer().encode(text)
    assert hf_tok.encode(text, add_special_tokens=True) == ids  # no BOS added, like our server
    assert hf_tok.decode(ids) == text


def test_hf_tokenizer_special_tokens_and_shipped_files(hf_tok, tmp_path):
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, len(hf_tok)) == \
        (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE)
    assert hf_tok.decode([BOS_ID, 65, EOS_ID], skip_special_tokens=True) == "A"
    # the shipped files are exactly what the recipe writes
    write_hf_tokenizer(tmp_path)
    for d in ("tiny-target", "tiny-draft"):
        for name in hf_tokenizer_files():
            assert json.loads((SHIPPED / d / name).read_text(encoding="utf-8")) == \
                json.loads((tmp_path / name).read_text(encoding="utf-8"))
