"""Tool-call parsing and rendering, without a model: whole replies, replies fed in pieces (as a
stream arrives), tolerance of malformed calls, the fallback prompt and the forced-call grammar."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from llm_serve.protocol import APIError, ChatMessage, ToolDefinition
from llm_serve.tool_parsers import (
    ContentDelta,
    ToolArgsDelta,
    ToolCallParser,
    ToolNameDelta,
    parse_tool_calls,
)
from llm_serve.tool_render import (
    choose_parser,
    render_messages,
    required_call_constraint,
    tool_context,
)

HERMES = (
    "Let me check. <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "opts": {"a": "}", "b": [1, 2]}}}\n'
    '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
)


def _stream(
    text: str, fmt: str, rng: random.Random
) -> tuple[str, dict[int, tuple[str, str]], list[Any]]:
    """Feed ``text`` in random pieces; (content, {index: (name, arguments)}, events)."""
    parser = ToolCallParser(fmt)
    events: list[Any] = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 7)
        events += parser.feed(text[i : i + n])
        i += n
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, tuple[str, str]] = {}
    for e in events:
        if isinstance(e, ToolNameDelta):
            assert e.index not in calls, "a call's name is sent once"
            calls[e.index] = (e.name, "")
        elif isinstance(e, ToolArgsDelta):
            name, args = calls[e.index]  # the name always comes first
            calls[e.index] = (name, args + e.arguments)
    return content, calls, events


def test_hermes_whole_and_streamed_agree() -> None:
    content, calls = parse_tool_calls(HERMES, "hermes")
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "opts": {"a": "}", "b": [1, 2]}}),
        ("get_time", {}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    for seed in range(20):
        streamed, pieces, events = _stream(HERMES, "hermes", random.Random(seed))
        assert streamed.strip() == content
        assert [pieces[i] for i in sorted(pieces)] == [(c.name, c.arguments) for c in calls]
        # Arguments arrive in several fragments, not only at the end of the call.
        assert sum(isinstance(e, ToolArgsDelta) for e in events) >= 2 or seed % 7 == 0


def test_llama3_json() -> None:
    text = '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {"s": "a;b"}}'
    content, calls = parse_tool_calls(text, "llama3_json")
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("f", {"x": 1}),
        ("g", {"s": "a;b"}),
    ]
    streamed, pieces, _ = _stream(text, "llama3_json", random.Random(0))
    assert not streamed and [pieces[i][0] for i in sorted(pieces)] == ["f", "g"]
    assert parse_tool_calls("The answer is 4.", "llama3_json") == ("The answer is 4.", [])


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>{not json}</tool_call> then text",
        '<tool_call>{"arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        "just text with a < sign and <tool",
    ],
)
def test_malformed_calls_stay_content(text: str) -> None:
    content, calls = parse_tool_calls(text, "hermes")
    assert calls == [] and content == text.strip()
    streamed, pieces, _ = _stream(text, "hermes", random.Random(1))
    assert streamed == text and not pieces


def test_unclosed_call_at_the_end_still_parses() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {"a": "x"}}', "hermes")
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"a": "x"}')]


def _tools() -> list[ToolDefinition]:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 3}},
        "required": ["n"],
    }
    return [
        ToolDefinition.model_validate(
            {"type": "function", "function": {"name": "f", "parameters": schema}}
        ),
        ToolDefinition.model_validate({"type": "function", "function": {"name": "g"}}),
    ]


def test_tool_context_checks() -> None:
    ctx = tool_context(_tools(), None, None)
    assert (ctx.choice, ctx.parallel, ctx.parses) == ("auto", True, True)
    assert tool_context(None, None, None).choice == "none"
    named = tool_context(_tools(), {"type": "function", "function": {"name": "g"}}, False)
    assert (named.choice, named.name, named.parallel) == ("named", "g", False)
    for bad in ("maybe", {"type": "function", "function": {"name": "h"}}, {"type": "x"}):
        with pytest.raises(APIError) as e:
            tool_context(_tools(), bad, None)
        assert e.value.status_code == 400 and e.value.param == "tool_choice"
    dup = _tools() + _tools()[:1]
    with pytest.raises(APIError, match="unique"):
        tool_context(dup, None, None)


def test_fallback_rendering() -> None:
    ctx = tool_context(_tools(), None, None)
    originals = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="n?"),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=[
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"n": 2}'}}
            ],
        ),
        ChatMessage(role="tool", tool_call_id="c1", content="ok"),
    ]
    plain = [{"role": m.role, "content": m.content or ""} for m in originals]
    out = render_messages(plain, originals, ctx, native=False)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "f"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"n": 2}}\n</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\nok\n</tool_response>"}
    native = render_messages(plain, originals, ctx, native=True)
    assert native[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"n": 2}}
    assert native[3] == {"role": "tool", "tool_call_id": "c1", "content": "ok"}
    bad = [*originals[:3], ChatMessage(role="tool", content="x")]
    with pytest.raises(APIError, match="tool_call_id"):
        render_messages([*plain[:3], {"role": "tool", "content": "x"}], bad, ctx, native=False)


def test_forced_call_grammar_accepts_exactly_valid_calls() -> None:
    import xgrammar as xgr

    info = xgr.TokenizerInfo(
        [bytes([i]) for i in range(256)] + [b""], xgr.VocabType.RAW, stop_token_ids=[256]
    )
    compiler = xgr.GrammarCompiler(info)

    def accepts(so: Any, text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiler.compile_grammar(so.spec))
        return matcher.accept_string(text) and matcher.accept_token(256)

    one = required_call_constraint(tool_context(_tools(), "required", False), "hermes")
    good = '<tool_call>\n{"name": "f", "arguments": {"n": 3}}\n</tool_call>'
    assert accepts(one, good)
    assert not accepts(one, '<tool_call>\n{"name": "f", "arguments": {"n": 4}}\n</tool_call>')
    assert not accepts(one, '<tool_call>\n{"name": "h", "arguments": {}}\n</tool_call>')
    assert not accepts(one, good + "\n" + good)
    many = required_call_constraint(tool_context(_tools(), "required", True), "hermes")
    assert accepts(many, good + "\n" + good)
    named = required_call_constraint(
        tool_context(_tools(), {"type": "function", "function": {"name": "g"}}, False),
        "llama3_json",
    )
    assert accepts(named, '{"name": "g", "parameters": {}}')
    assert not accepts(named, '{"name": "f", "parameters": {"n": 1}}')
    assert (
        choose_parser(object(), None) == "hermes"
        and choose_parser(object(), "llama3_json") == "llama3_json"
    )
