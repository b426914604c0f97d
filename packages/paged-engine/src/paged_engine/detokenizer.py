"""Incremental detokenization that never splits a multi-byte character."""

from __future__ import annotations

from typing import Protocol

__all__ = ["IncrementalDetokenizer", "TokenDecoder"]


class TokenDecoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Accumulates generated text token by token in O(window) work per token.

    Decoding a window of recent tokens and comparing it with the window without the newest
    tokens yields the new text; text is held back while it ends in U+FFFD (an incomplete UTF-8
    sequence split across tokens), and the window starts a few tokens back so tokenizers that
    treat a leading token specially (a leading space) see context.
    """

    # Tokens of context decoded before the new ones (as vLLM does).
    _CONTEXT = 5

    def __init__(self, tokenizer: TokenDecoder | None, prompt_token_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_token_ids[-self._CONTEXT :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def append(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        if self._tok is None:
            return ""
        prefix = self._tok.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        full = self._tok.decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.text += new
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            # Keep the window bounded: older ids are never decoded again.
            if self._prefix_offset > 64:
                drop = self._prefix_offset
                self._ids = self._ids[drop:]
                self._prefix_offset -= drop
                self._read_offset -= drop
            return new
        return ""
