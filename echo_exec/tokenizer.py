"""Byte-level tokenizer shipped with the tiny model pair: token ids 0..255 are the UTF-8 bytes, then BOS,
EOS and PAD. Nothing to download, nothing to train, and every string round-trips exactly."""

from __future__ import annotations

from collections.abc import Iterable

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
