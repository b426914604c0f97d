"""The exact bytes of one token, for ``logprobs`` ``bytes`` (OpenAI's field).

Decoding a single token of a multi-byte character gives U+FFFD, not its bytes. The bytes
are read from the vocabulary instead: byte-level BPE pieces (GPT-2's byte-to-character map),
SentencePiece byte-fallback pieces (``<0xAB>``), and the byte tokenizer's ids 0..255; any other
token falls back to its decoded text in UTF-8.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = ["token_bytes"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the others
    for the characters from U+0100 on, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _is_byte_level(tok: Any) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def token_bytes(tok: Any, token_id: int) -> bytes:
    """The bytes token ``token_id`` stands for in ``tok``'s vocabulary."""
    convert = getattr(tok, "convert_ids_to_tokens", None)
    if convert is None:
        if 0 <= token_id < 256:  # the byte tokenizer: ids are bytes
            return bytes([token_id])
        return str(tok.decode([token_id])).encode("utf-8")
    piece = convert(token_id)
    if isinstance(piece, str):
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        table = _byte_decoder()
        if _is_byte_level(tok) and all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return str(tok.decode([token_id])).encode("utf-8")
