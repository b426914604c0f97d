"""``llm-serve chat``: a terminal chat over the in-process pipeline.

The conversation is kept as a list of messages and sent whole through the model's chat template
every turn, so earlier turns' KV blocks come back from the prefix cache. Replies stream as
they are generated. Commands: ``/reset`` (forget the conversation, keep the system prompt),
``/exit`` (or end of input). Ctrl-C during a reply stops it (the partial reply is kept);
Ctrl-C at the prompt exits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paged_engine import PromptTooLongError, SamplingParams

from .pipeline import Pipeline

__all__ = ["ChatSession", "run_chat"]

PROMPT = ">>> "
HELP = "Commands: /reset clears the conversation, /exit quits (so does Ctrl-D)."


@dataclass
class ChatSession:
    """A multi-turn conversation with ``pipe``.

    ``history`` holds the messages so far (the system prompt, when given, first).
    ``reply(text, write)`` adds a user turn, streams the answer through ``write`` (each piece
    as soon as it is generated) and adds it to the history. Turns that no longer fit the
    model's context are dropped, oldest first (the system prompt stays).
    """

    pipe: Pipeline
    gen_config: SamplingParams
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    last_cached_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.history:
            self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _fit(self, messages: list[dict[str, str]]) -> list[int]:
        """Drop the oldest turns of ``messages`` (in place) until its prompt fits the context;
        returns the prompt. Raises ``ValueError`` when even the last message alone is too long."""
        engine = self.pipe.engine
        first = 1 if self.system else 0
        while True:
            try:
                return engine.check_prompt(engine.chat_prompt(messages))
            except PromptTooLongError as exc:
                if len(messages) - first <= 1:
                    raise ValueError(f"the message is too long for this model: {exc}") from None
            del messages[first]  # the oldest turn goes first: its question and answer
            while len(messages) - first > 1 and messages[first]["role"] != "user":
                del messages[first]

    def reply(self, text: str, write: Callable[[str], Any]) -> str:
        """Answer ``text`` (streamed through ``write``); returns the whole reply. Raises
        ``ValueError`` (keeping the history as it was) when ``text`` cannot fit the context."""
        messages = [*self.history, {"role": "user", "content": text}]
        prompt = self._fit(messages)
        self.history = messages
        parts: list[str] = []
        stream = self.pipe.stream_infer(prompt, self.gen_config)
        try:
            for delta in stream:
                self.last_cached_tokens = delta.cached_tokens
                if delta.text:
                    parts.append(delta.text)
                    write(delta.text)
        finally:
            stream.close()  # on Ctrl-C: aborts the request
            self.history.append({"role": "assistant", "content": "".join(parts)})
        return "".join(parts)


def run_chat(
    session: ChatSession,
    read: Callable[[str], str],
    write: Callable[[str], Any],
) -> int:
    """The read-answer loop: ``read(prompt)`` returns a line (raises ``EOFError`` at the end);
    ``write`` shows text (flushing is its business). Returns the exit status (0)."""
    write(HELP + "\n")
    while True:
        try:
            line = read(PROMPT)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            write("(conversation cleared)\n")
            continue
        if text in ("/help", "/?"):
            write(HELP + "\n")
            continue
        try:
            session.reply(text, write)
        except KeyboardInterrupt:
            write(" [stopped]")
        except ValueError as exc:
            write(f"error: {exc}")
        write("\n")
