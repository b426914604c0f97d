"""Model output -> OpenAI tool calls, incrementally (streaming) or at once.

Formats (``--tool-call-parser``):

- ``hermes`` (Hermes, Qwen 2.5 / 3, and this server's fallback prompt): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; text outside the tags is content.
- ``llama3_json`` (Llama 3.1+ JSON tool calling): the whole reply is
  ``{"name": ..., "parameters": {...}}`` (``arguments`` also accepted), optionally after
  ``<|python_tag|>``, several separated by ``;``.

Parsing is tolerant: anything that does not parse as a call stays content. Arguments are sent
as the model wrote them (compact JSON under a grammar), checked to be a JSON object.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TOOL_CALL_PARSERS",
    "ContentDelta",
    "ParsedCall",
    "ToolArgsDelta",
    "ToolCallParser",
    "ToolNameDelta",
    "parse_tool_calls",
]

TOOL_CALL_PARSERS = ("hermes", "llama3_json")

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolNameDelta:
    index: int
    id: str
    name: str


@dataclass
class ToolArgsDelta:
    index: int
    arguments: str


Event = ContentDelta | ToolNameDelta | ToolArgsDelta


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _whole_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of one complete call object, or None."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    m = _HEAD.match(body)
    if m is not None:
        raw = body[m.end() :].rstrip()
        if raw.endswith("}"):
            raw = raw[:-1].rstrip()
            try:
                if json.loads(raw) == args:
                    return obj["name"], raw  # keep the model's own spelling
            except json.JSONDecodeError:
                pass
    return obj["name"], json.dumps(args, ensure_ascii=False)


@dataclass
class ToolCallParser:
    """Feed a choice's text deltas; get content and tool-call events in order. ``finish()``
    flushes what was held back; ``calls`` lists the complete calls parsed so far.

    Events: a call's name comes first (``ToolNameDelta``, with its id), then fragments of its
    arguments (``ToolArgsDelta``) whose concatenation is the arguments' JSON text, as the OpenAI
    API streams them."""

    fmt: str = "hermes"
    calls: list[ParsedCall] = field(default_factory=list)
    _buf: str = ""
    _in_call: bool = False
    _started: bool = False  # llama3_json: decided whether the reply is a call
    _name_sent: bool = False
    _args_sent: int = 0

    def __post_init__(self) -> None:
        if self.fmt not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"unknown tool-call parser {self.fmt!r}; use one of {TOOL_CALL_PARSERS}"
            )

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        return self._hermes(final=False) if self.fmt == "hermes" else self._llama(final=False)

    def finish(self) -> list[Event]:
        return self._hermes(final=True) if self.fmt == "hermes" else self._llama(final=True)

    # -- hermes ---------------------------------------------------------------------------------

    def _hermes(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if not self._in_call:
                at = self._buf.find(_OPEN)
                if at < 0:
                    keep = 0 if final else _partial_suffix(self._buf, _OPEN)
                    cut = len(self._buf) - keep
                    if cut:
                        events.append(ContentDelta(self._buf[:cut]))
                    self._buf = self._buf[cut:]
                    return events
                if at:
                    events.append(ContentDelta(self._buf[:at]))
                self._buf = self._buf[at + len(_OPEN) :]
                self._in_call, self._name_sent, self._args_sent = True, False, 0
                continue
            end = self._buf.find(_CLOSE)
            if end < 0 and not final:
                events.extend(self._partial_call(self._buf))
                return events
            body = self._buf if end < 0 else self._buf[:end]
            events.extend(self._complete_call(body, f"{_OPEN}{body}{'' if end < 0 else _CLOSE}"))
            self._buf = "" if end < 0 else self._buf[end + len(_CLOSE) :]
            self._in_call = False
            if end < 0:
                return events

    def _partial_call(self, body: str) -> list[Event]:
        """Stream the name once known, then the arguments text except a possible last ``}``
        (it may close the call object rather than the arguments)."""
        m = _HEAD.match(body)
        if m is None or not body[m.end() :].startswith("{"):
            return []  # announce a call only once it looks like one (arguments: an object)
        events: list[Event] = []
        if not self._name_sent:
            try:
                name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                return []
            self.calls.append(ParsedCall(_call_id(), name, ""))
            events.append(ToolNameDelta(len(self.calls) - 1, self.calls[-1].id, name))
            self._name_sent = True
        raw = body[m.end() :]
        safe = raw[: raw.rfind("}")] if "}" in raw else raw
        if len(safe) > self._args_sent:
            events.append(ToolArgsDelta(len(self.calls) - 1, safe[self._args_sent :]))
            self._args_sent = len(safe)
            self.calls[-1].arguments = safe
        return events

    def _complete_call(self, body: str, original: str) -> list[Event]:
        parsed = _whole_call(body)
        if parsed is None:
            if self._name_sent:  # already announced: finish it as well as we can
                return []
            return [ContentDelta(original)]
        name, args = parsed
        events: list[Event] = []
        if not self._name_sent:
            self.calls.append(ParsedCall(_call_id(), name, ""))
            events.append(ToolNameDelta(len(self.calls) - 1, self.calls[-1].id, name))
            self._args_sent = 0
        call = self.calls[-1]
        # ``call.arguments`` holds what was streamed; when the final spelling does not extend
        # it (rare: a re-encoded value), nothing sensible can be appended.
        rest = args[len(call.arguments) :] if args.startswith(call.arguments) else ""
        if rest:
            events.append(ToolArgsDelta(len(self.calls) - 1, rest))
        call.arguments = args
        self._name_sent, self._args_sent = False, 0
        return events

    # -- llama3 json ----------------------------------------------------------------------------

    def _llama(self, final: bool) -> list[Event]:
        if not self._started:
            head = self._buf.lstrip().removeprefix("<|python_tag|>").lstrip()
            if not head or (not final and "<|python_tag|>".startswith(self._buf.lstrip())):
                return []
            self._started = True
            self._in_call = head.startswith("{")
        if not self._in_call:
            text, self._buf = self._buf, ""
            return [ContentDelta(text)] if text else []
        if not final:
            return []  # a reply that is a call: parsed whole at the end
        text = self._buf.lstrip().removeprefix("<|python_tag|>")
        parts = [p for p in _split_top_level(text, ";") if p.strip()]
        found = [_whole_call(p.strip()) for p in parts]
        if not found or any(f is None for f in found):
            self._buf = ""
            return [ContentDelta(text)]
        events: list[Event] = []
        for name, args in (f for f in found if f is not None):
            self.calls.append(ParsedCall(_call_id(), name, args))
            events.append(ToolNameDelta(len(self.calls) - 1, self.calls[-1].id, name))
            events.append(ToolArgsDelta(len(self.calls) - 1, args))
        self._buf = ""
        return events


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside JSON strings and brackets."""
    parts, depth, in_str, esc, start = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[ParsedCall]]:
    """``(content or None, calls)`` of a whole reply."""
    parser = ToolCallParser(fmt)
    events: list[Any] = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta)).strip()
    return (content or None), parser.calls
