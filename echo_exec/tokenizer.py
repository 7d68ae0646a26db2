"""Byte-level tokenizer shipped with the tiny model pair: token ids 0..255 are the UTF-8 bytes, then BOS,
EOS and PAD. Nothing to download, nothing to train, and every string round-trips exactly."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259


class ByteTokenizer:
    """encode(str) -> list[int] of byte ids (optionally with BOS/EOS); decode drops the special ids."""

    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int], *, errors: str = "replace") -> str:
        """Bytes to text; special ids are dropped. A token stream cut mid-character decodes with U+FFFD
        (`errors="replace"`); streaming callers should use `decode_bytes` and buffer incomplete characters."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i >= VOCAB_SIZE or i < 0:
                raise ValueError(f"token id {i} is outside the byte vocabulary (0..{VOCAB_SIZE - 1})")
        return bytes(out)


# Hugging Face form of the same tokenizer, so that any HF-compatible server (SGLang, vLLM, transformers) reads the
# shipped models' text exactly as ours does: a byte-level BPE with no merges, each byte one token of its own id.
SPECIAL_TOKENS = {BOS_ID: "<|echo_bos|>", EOS_ID: "<|echo_eos|>", PAD_ID: "<|echo_pad|>"}


def _byte_chars() -> list[str]:
    """The printable character the HF/GPT-2 byte-level scheme stands in for each byte (index = byte)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in kept:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


# A plain chat template for the tiny pair (trained on code and prose, not on chats): each message as a "role:" line
# and its text, then "assistant:" for the reply. Chat clients (/v1/chat/completions, SGLang, vLLM) render it.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def hf_tokenizer_files() -> dict[str, dict]:
    """{file name: JSON object} of tokenizer.json and tokenizer_config.json for ByteTokenizer (no BOS added)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in SPECIAL_TOKENS.items()],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: i for i, c in enumerate(_byte_chars())}, "merges": []},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS_ID],
              "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID], "add_bos_token": False,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "chat_template": CHAT_TEMPLATE}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}


def write_hf_tokenizer(model_dir: str | Path) -> None:
    for name, obj in hf_tokenizer_files().items():
        (Path(model_dir) / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
