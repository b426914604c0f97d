"""The tokenizer interface the engine uses, and a byte-level tokenizer for models without one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["ByteTokenizer", "Tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (a transformers tokenizer satisfies it)."""

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tokenize: bool = ...,
        add_generation_prompt: bool = ...,
        continue_final_message: bool = ...,
        **kwargs: Any,
    ) -> Any: ...

    def __len__(self) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``<|endoftext|>`` (256) as end of sequence.

    Used by ``dummy:`` models and by model directories that ship no tokenizer. Ids outside the
    vocabulary (a model whose embedding is larger) decode to nothing.
    """

    EOS = 256
    _EOS_TEXT = "<|endoftext|>"

    def __init__(self) -> None:
        self.eos_token_id: int | None = self.EOS
        self.bos_token_id: int | None = None
        self.pad_token_id: int | None = self.EOS
        self.all_special_ids = [self.EOS]
        self.chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return 257

    def __len__(self) -> int:
        return 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        parts: list[str] = []
        buf = bytearray()
        for t in token_ids:
            t = int(t)
            if 0 <= t < 256:
                buf.append(t)
                continue
            if t == self.EOS and not skip_special_tokens:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                parts.append(self._EOS_TEXT)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        *,
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        **_: Any,
    ) -> str | list[int]:
        """A plain ``role: content`` transcript, one message per line; with
        ``continue_final_message`` the last message is left open (no newline) to be continued."""
        text = "".join(f"{m['role']}: {m['content']}\n" for m in conversation)
        if continue_final_message:
            text = text[:-1]
        elif add_generation_prompt:
            text += "assistant: "
        return self.encode(text) if tokenize else text
