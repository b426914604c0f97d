"""The chat answer format when replies are parsed into tool calls (tool_parsers.py): whole
answers get ``message.tool_calls``; streams send each call's name, then argument fragments."""

from __future__ import annotations

from dataclasses import dataclass, field

from paged_engine import RequestOutput

from .formats import ChatFormat
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    UsageInfo,
)
from .tool_parsers import (
    ContentDelta,
    ToolArgsDelta,
    ToolCallParser,
    ToolNameDelta,
    parse_tool_calls,
)

__all__ = ["ToolChatFormat"]


@dataclass
class ToolChatFormat(ChatFormat):
    """``ChatFormat`` whose replies are parsed in ``tool_format`` (``hermes`` /
    ``llama3_json``); a reply that called tools and stopped finishes with ``tool_calls``."""

    tool_format: str = "hermes"
    _parsers: dict[int, ToolCallParser] = field(default_factory=dict)

    def response(self, outs: list[RequestOutput], usage: UsageInfo) -> ChatCompletionResponse:
        body = super().response(outs, usage)
        body.choices = [self._with_calls(c, o) for c, o in zip(body.choices, outs, strict=True)]
        return body

    def _with_calls(self, choice: ChatChoice, out: RequestOutput) -> ChatChoice:
        content, calls = parse_tool_calls(out.text, self.tool_format)
        if not calls:
            return choice
        choice.message = ChatResponseMessage(
            content=content,
            tool_calls=[
                ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                for c in calls
            ],
        )
        if choice.finish_reason == "stop":
            choice.finish_reason = "tool_calls"
        return choice

    def chunk(self, choice: int, out: RequestOutput, delta: str, first: int) -> ChatCompletionChunk:
        parser = self._parsers.setdefault(choice, ToolCallParser(self.tool_format))
        message = _tool_delta(parser, delta, out.finished)
        finish: str | None = out.finish_reason if out.finished else None
        if parser.calls and finish == "stop":
            finish = "tool_calls"
        body = ChatStreamChoice(
            index=choice, delta=message, logprobs=self._logprobs(out, first), finish_reason=finish
        )
        return self._chunk([body])


def _tool_delta(parser: ToolCallParser, text: str, finished: bool) -> DeltaMessage:
    """One streamed chat delta from a parser fed ``text``: content and tool-call pieces (the
    name with the call's id first, then argument fragments)."""
    events = parser.feed(text) + (parser.finish() if finished else [])
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    if parser.calls and not content.strip():
        content = ""  # whitespace between calls is not worth a content delta
    pieces: list[DeltaToolCall] = []
    for e in events:
        if isinstance(e, ToolNameDelta):
            fn = DeltaFunctionCall(name=e.name, arguments="")
            pieces.append(DeltaToolCall(index=e.index, id=e.id, type="function", function=fn))
        elif isinstance(e, ToolArgsDelta):
            fn = DeltaFunctionCall(arguments=e.arguments)
            pieces.append(DeltaToolCall(index=e.index, function=fn))
    return DeltaMessage(content=content or None, tool_calls=pieces or None)
