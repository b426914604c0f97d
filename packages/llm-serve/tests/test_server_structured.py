"""Structured output and tool calling through the HTTP API, with a random-weight model: the
constraint alone must make the output valid. Driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from llm_serve import ServerSettings, build_app
from llm_serve.async_engine import AsyncEngine
from llm_serve.tool_parsers import parse_tool_calls
from paged_engine import EngineConfig, LLMEngine
from paged_engine.testing import random_json_schema

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
        },
    },
}
SCHEMAS = {
    "get_weather": WEATHER["function"]["parameters"],
    "get_time": CLOCK["function"]["parameters"],
}


@pytest.fixture(scope="module")
def server(tiny_model: str, in_process_server: Any) -> Iterator[Any]:
    engine = AsyncEngine(
        lambda: LLMEngine(EngineConfig(model=tiny_model, device="cpu", num_blocks=2048))
    )
    app = build_app(engine, ServerSettings(model_name="tiny", request_timeout=120))
    server = in_process_server(app)
    assert engine.wait_ready(120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_thirty_random_schemas_streaming_and_not(server: Any) -> None:
    rng = random.Random(1)
    schemas = [random_json_schema(rng) for _ in range(30)]
    aclient = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120
    )

    async def one(i: int, schema: dict[str, Any]) -> tuple[str, str | None]:
        fmt: Any = {
            "type": "json_schema",
            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True},
        }
        kw: dict[str, Any] = {
            "model": "tiny",
            "messages": _user(f"item {i}"),
            "max_tokens": 1500,
            "seed": i,
            "response_format": fmt,
        }
        if i % 2:
            text, finish = "", None
            stream = await aclient.chat.completions.create(stream=True, **kw)
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
            return text, finish
        r = await aclient.chat.completions.create(**kw)
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    async def run() -> list[tuple[str, str | None]]:
        try:
            return await asyncio.gather(*(one(i, s) for i, s in enumerate(schemas)))
        finally:
            await aclient.close()

    for schema, (text, finish) in zip(schemas, asyncio.run(run()), strict=True):
        assert finish == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_vllm_extras_and_json_object(client: openai.OpenAI, stream: bool) -> None:
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"guided_regex": r"\d{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"\d{3}-[a-z]{2}", t)),
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"regex": "x+y"}}, lambda t: re.fullmatch("x+y", t)),
        ({"guided_grammar": 'root ::= "<" [a-c]+ ">"'}, lambda t: re.fullmatch("<[a-c]+>", t)),
        (
            {"guided_json": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
            lambda t: isinstance(json.loads(t), list),
        ),
    ]
    for extra, check in cases:
        for seed in range(2):
            kw: dict[str, Any] = {
                "model": "tiny",
                "messages": _user("go"),
                "max_tokens": 400,
                "seed": seed,
                "extra_body": extra,
            }
            if stream:
                text = "".join(
                    c.delta.content or ""
                    for chunk in client.chat.completions.create(stream=True, **kw)
                    for c in chunk.choices
                )
            else:
                text = client.chat.completions.create(**kw).choices[0].message.content or ""
            assert check(text), (extra, text)
    r = client.completions.create(
        model="tiny", prompt="id:", max_tokens=50, extra_body={"guided_regex": "[0-9]{4}"}
    )
    assert re.fullmatch("[0-9]{4}", r.choices[0].text)
    r2 = client.chat.completions.create(
        model="tiny",
        messages=_user("obj"),
        max_tokens=3000,
        seed=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(r2.choices[0].message.content or ""), dict)


def test_n_choices_each_satisfy_the_constraint(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny",
        messages=_user("n"),
        n=3,
        max_tokens=20,
        extra_body={"guided_choice": ["a1", "b2", "c3"]},
    )
    assert len(r.choices) == 3 and all(c.message.content in ("a1", "b2", "c3") for c in r.choices)


def test_grammar_that_cannot_finish_ends_with_length(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "minLength": 40}},
        "required": ["s"],
    }
    r = client.chat.completions.create(
        model="tiny",
        messages=_user("x"),
        max_tokens=10,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},  # type: ignore[typeddict-item]
    )
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content or "")


BAD = [
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "integer", "minimum": 3, "maximum": 1},
                },
            }
        },
        "response_format",
    ),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "(open"}, "guided_regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= nowhere"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
]


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_constraints_get_400(server: Any, extra: dict[str, Any], param: str) -> None:
    body = {"model": "tiny", "messages": _user("x"), "max_tokens": 4, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def _check_calls(calls: Any, allowed: set[str]) -> None:
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function" and c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_tool_choice_required_and_named(client: openai.OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=_user("weather?"),
            tools=[WEATHER, CLOCK],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=2000,
            seed=seed,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
        assert choice.message.content is None
    r = client.chat.completions.create(
        model="tiny",
        messages=_user("time?"),
        tools=[WEATHER, CLOCK],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        max_tokens=2000,
    )
    calls = r.choices[0].message.tool_calls
    _check_calls(calls, {"get_time"})
    assert calls is not None and len(calls) == 1


def test_streamed_tool_calls_assemble_with_the_sdk_helper(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": "tiny",
        "messages": _user("weather?"),
        "tools": [WEATHER, CLOCK],
        "tool_choice": "required",
        "max_tokens": 2000,
        "seed": 5,
    }
    with client.chat.completions.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    # The name came in its own delta, before any argument text.
    kinds = [e.type for e in events]
    assert "tool_calls.function.arguments.delta" in kinds
    assert kinds.index("tool_calls.function.arguments.done") > kinds.index(
        "tool_calls.function.arguments.delta"
    )
    # The same request without streaming gives the same calls (same seed).
    plain = client.chat.completions.create(**kw).choices[0].message.tool_calls
    assert plain is not None and choice.message.tool_calls is not None
    assert [(c.function.name, c.function.arguments) for c in plain] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]


def test_tool_result_turn_and_auto(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], max_tokens=8
    )  # type: ignore[list-item]
    choice = r.choices[0]
    # auto: whatever the model wrote is parsed tolerantly; a random model writes text.
    _, calls = parse_tool_calls(choice.message.content or "", "hermes")
    assert (
        choice.finish_reason in ("stop", "length") and not choice.message.tool_calls and not calls
    )
    bad = [*messages[:3], {"role": "tool", "content": "x"}]
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        client.chat.completions.create(model="tiny", messages=bad, max_tokens=2)
