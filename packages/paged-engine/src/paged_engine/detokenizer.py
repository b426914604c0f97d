"""Incremental detokenization that never splits a multi-byte character, with stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .stop_checker import find_stop, partial_stop_len

__all__ = ["IncrementalDetokenizer", "TokenDecoder"]


class TokenDecoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Accumulates generated text token by token in O(window) work per token.

    Decoding a window of recent tokens and comparing it with the window without the newest
    tokens yields the new text; text is held back while it ends in U+FFFD (an incomplete UTF-8
    sequence split across tokens, e.g. byte-fallback tokens of an emoji), and the window starts
    a few tokens back so tokenizers that treat a leading token specially (a leading space) see
    context. Special tokens are skipped unless ``skip_special_tokens`` is False. Stop strings
    end the text only from the ``min_tokens``-th appended token on.

    Contract for ``text`` (what a caller may show): it only ever grows by appending, so a
    streaming caller can send ``text[len(previous):]``; ``append`` returns exactly that
    growth. With ``stop`` strings, the end of the decoded text that is a proper prefix of a
    stop string is held back until it can no longer become one; once a stop string completes,
    ``stopped`` is set and ``text`` ends before it (or after it with ``include_stop``) and
    never changes again. ``flush`` (at the end of generation) releases whatever was held back:
    an incomplete character (decoded with U+FFFD, as a one-shot decode would) and a partial
    stop string.
    """

    # Tokens of context decoded before the new ones (as vLLM does).
    _CONTEXT = 5

    def __init__(
        self,
        tokenizer: TokenDecoder | None,
        prompt_token_ids: list[int],
        stop: Sequence[str] = (),
        include_stop: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._stop_after = min_tokens  # tokens appended before a stop string may end the text
        self._ids: list[int] = list(prompt_token_ids[-self._CONTEXT :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stops = [s for s in stop if s]
        self._include_stop = include_stop
        self._decoded = ""  # every complete character decoded so far
        self.text = ""
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended generation

    def append(self, token_id: int) -> str:
        """Add one generated token; return the text it releases (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._stop_after -= 1
        if self._tok is None:
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        checked = len(self._decoded)
        self._decoded += full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Keep the window bounded: older ids are never decoded again.
        if self._prefix_offset > 64:
            drop = self._prefix_offset
            self._ids = self._ids[drop:]
            self._prefix_offset -= drop
            self._read_offset -= drop
        if not self._stops:
            return self._release(len(self._decoded))
        hit = find_stop(self._decoded, self._stops, checked) if self._stop_after <= 0 else None
        if hit is not None:
            begin, end = hit
            self.stopped = True
            self.stop_string = self._decoded[begin:end]
            return self._release(end if self._include_stop else begin)
        return self._release(len(self._decoded) - partial_stop_len(self._decoded, self._stops))

    def flush(self) -> str:
        """Release everything held back (generation has ended); return the released text."""
        if self.stopped or self._tok is None:
            return ""
        if self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
            full = self._decode(self._ids[self._prefix_offset :])
            if len(full) > len(prefix):
                self._decoded += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(len(self._decoded))

    def _decode(self, ids: list[int]) -> str:
        assert self._tok is not None
        return self._tok.decode(ids, skip_special_tokens=self._skip_special)

    def _release(self, upto: int) -> str:
        """Grow ``text`` to ``_decoded[:upto]`` (never shrink it); return the growth."""
        if upto <= len(self.text):
            return ""
        new = self._decoded[len(self.text) : upto]
        self.text += new
        return new
