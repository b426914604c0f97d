"""Tool calling on the request side: checking ``tools`` / ``tool_choice``, turning OpenAI
messages (assistant ``tool_calls``, ``tool`` results) into the chat template's input, and the
grammar that enforces ``tool_choice="required"`` or a named function.

Rendering: a chat template that mentions ``tools`` gets them as ``apply_chat_template(...,
tools=...)`` and the messages in transformers' tool format. Otherwise (the fallback) the tool
schemas and the call format go into the system prompt (:func:`fallback_system_prompt`),
assistant calls are written as ``<tool_call>`` blocks and tool results as user messages
wrapped in ``<tool_response>``; replies are then parsed with the ``hermes`` parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from paged_engine import StructuredOutput
from paged_engine.grammars import bounded_strings_as_patterns

from .protocol import APIError, ChatMessage, ToolDefinition

__all__ = [
    "ToolContext",
    "choose_parser",
    "fallback_system_prompt",
    "render_messages",
    "template_supports_tools",
    "tool_context",
]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolContext:
    """A chat request's tools: the functions, the choice (``none`` / ``auto`` / ``required`` /
    a function name) and whether several calls may come in one reply."""

    tools: list[dict[str, Any]]  # OpenAI tool objects, as sent
    choice: str  # none | auto | required | named
    name: str | None  # for choice == "named"
    parallel: bool

    @property
    def parses(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def tool_context(
    tools: Sequence[ToolDefinition] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
) -> ToolContext:
    """Check the tool fields of a request; raises ``APIError(400)`` naming the bad one."""
    defs: list[dict[str, Any]] = []
    for i, t in enumerate(tools or []):
        f = t.function
        if not _NAME.match(f.name):
            raise _bad(
                f"tools[{i}].function.name",
                f"tool name {f.name!r} must be 1-64 letters, digits, '_', '.' or '-'",
            )
        params = f.parameters if f.parameters is not None else {"type": "object", "properties": {}}
        fn: dict[str, Any] = {"name": f.name, "parameters": params}
        if f.description:
            fn["description"] = f.description
        defs.append({"type": "function", "function": fn})
    names = [d["function"]["name"] for d in defs]
    if len(set(names)) != len(names):
        raise _bad("tools", "tool names must be unique")
    name: str | None = None
    if tool_choice is None:
        choice = "auto" if defs else "none"
    elif isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise _bad(
                "tool_choice",
                f"'tool_choice' must be none, auto, required or a function, got {tool_choice!r}",
            )
        choice = tool_choice
    else:
        fn_choice = tool_choice.get("function")
        if tool_choice.get("type") != "function" or not isinstance(fn_choice, dict):
            raise _bad(
                "tool_choice",
                'a named \'tool_choice\' is {"type": "function", "function": {"name": ...}}',
            )
        name = fn_choice.get("name")
        if name not in names:
            raise _bad("tool_choice", f"'tool_choice' names {name!r}, which is not in 'tools'")
        choice = "named"
    if choice in ("required", "named") and not defs:
        raise _bad("tool_choice", f"'tool_choice' {choice!r} needs 'tools'")
    return ToolContext(
        defs, choice, name, True if parallel_tool_calls is None else parallel_tool_calls
    )


def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def choose_parser(tokenizer: Any, override: str | None) -> str:
    """The tool-call format of this model: the override, else read off its chat template
    (``<tool_call>`` -> hermes, ``<|python_tag|>`` / ``ipython`` -> llama3_json), else hermes
    (the format the fallback prompt asks for)."""
    if override:
        return override
    if not template_supports_tools(tokenizer):
        return "hermes"
    template = str(tokenizer.chat_template)
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def fallback_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Tool instructions for a model whose chat template has no tool support."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call functions to help answer. The functions, as JSON schemas:\n"
        f"<tools>\n{lines}\n</tools>\n"
        "To call a function, reply with one block per call:\n"
        '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n'
        "</tool_call>\n"
        "Function results come back in <tool_response> blocks."
    )


def _arguments(text: str | None, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        raise _bad(param, f"'{param}' must be a JSON object in a string") from None
    if not isinstance(value, dict):
        raise _bad(param, f"'{param}' must be a JSON object in a string")
    return value


def _tool_calls(m: ChatMessage, i: int) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for j, c in enumerate(m.tool_calls or []):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(
                where,
                f'\'{where}\' must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}',
            )
        calls.append(
            {
                "id": str(c.get("id") or f"call_{i}_{j}"),
                "type": "function",
                "function": {
                    "name": fn["name"],
                    "arguments": _arguments(fn.get("arguments"), f"{where}.function.arguments"),
                },
            }
        )
    return calls


def render_messages(
    messages: list[dict[str, Any]],
    originals: Sequence[ChatMessage],
    ctx: ToolContext,
    native: bool,
) -> list[dict[str, Any]]:
    """Add the tool parts of ``originals`` to the plain ``messages`` (same order): the
    template's own format when ``native``, else the fallback's text (see the module doc)."""
    out: list[dict[str, Any]] = []
    for i, (msg, m) in enumerate(zip(messages, originals, strict=True)):
        calls = _tool_calls(m, i) if m.role == "assistant" else []
        if m.role == "tool":
            if not m.tool_call_id:
                raise _bad(f"messages[{i}].tool_call_id", "a tool message needs 'tool_call_id'")
            if native:
                out.append(
                    {"role": "tool", "tool_call_id": m.tool_call_id, "content": msg["content"]}
                )
            else:
                text = f"<tool_response>\n{msg['content']}\n</tool_response>"
                out.append({"role": "user", "content": text})
            continue
        if calls and native:
            out.append({**msg, "tool_calls": calls})
        elif calls:
            blocks = "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                    ensure_ascii=False,
                )
                + "\n</tool_call>"
                for c in calls
            )
            text = f"{msg['content']}\n{blocks}" if msg["content"] else blocks
            out.append({**msg, "content": text})
        else:
            out.append(msg)
    if ctx.tools and not native:
        prompt = fallback_system_prompt(ctx.tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def required_call_constraint(ctx: ToolContext, fmt: str) -> StructuredOutput:
    """The grammar for ``tool_choice`` required / named: one call (or, with parallel calls,
    one or more) of the allowed functions in format ``fmt``, arguments valid against each
    function's parameters schema."""
    allowed = [
        t["function"]
        for t in ctx.tools
        if ctx.choice != "named" or t["function"]["name"] == ctx.name
    ]
    key = "parameters" if fmt == "llama3_json" else "arguments"
    try:
        return _calls_grammar(allowed, key, fmt, ctx.parallel)
    except Exception as exc:  # xgrammar rejects a parameters schema it cannot compile
        reason = str(exc).strip().splitlines()
        raise _bad(
            "tools",
            f"a tool's parameters schema does not compile: {reason[0] if reason else exc!r}",
        ) from None


def _calls_grammar(
    allowed: list[dict[str, Any]], key: str, fmt: str, parallel: bool
) -> StructuredOutput:
    variants = [
        xgr.Grammar.from_json_schema(
            json.dumps(
                bounded_strings_as_patterns(
                    {
                        "type": "object",
                        "properties": {
                            "name": {"const": f["name"]},
                            key: f["parameters"] or _ANY_OBJECT,
                        },
                        "required": ["name", key],
                    }
                )
            ),
            any_whitespace=False,
            strict_mode=True,
        )
        for f in allowed
    ]
    call = variants[0] if len(variants) == 1 else xgr.Grammar.union(*variants)
    if fmt == "hermes":
        call = xgr.Grammar.concat(
            xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'),
            call,
            xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'),
        )
        sep = '"\\n"'
    else:
        sep = '"; "'
    text = str(call)
    if parallel:  # one or more calls: a new start rule over the single-call grammar
        text = str(
            xgr.Grammar.from_ebnf(f"{text}\ncalls ::= root ({sep} root)*", root_rule_name="calls")
        )
    return StructuredOutput.grammar(text)
