"""Tool calling with the bundled model through the official openai client: a forced call
(``tool_choice="required"``), the tool's result sent back, and ``auto`` turns."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
import torch
import uvicorn

from llm_serve import ServerSettings, build_app
from llm_serve.async_engine import AsyncEngine
from paged_engine import EngineConfig, LLMEngine

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    # The server shares this process: one thread, or OpenMP spin-waits stall every step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = AsyncEngine(lambda: LLMEngine(EngineConfig(model="default", device="cpu")))
    app = build_app(engine, ServerSettings(model_name="default", request_timeout=120))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.05)
        # The first load converts the GGUF (minutes on a busy two-core machine).
        assert engine.wait_ready(600), "the bundled model did not load"
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    finally:
        server.should_exit = True
        thread.join(30)
        engine.stop()
        torch.set_num_threads(threads)


def _valid(call: Any) -> None:
    assert call.id and call.type == "function" and call.function.name in PARAMS
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_two_tool_conversation(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model="default",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=40,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _valid(call)

    # The tool's result goes back; the model may answer or call again (auto), parsed either way.
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"weather": "sunny, 21 C"}'},
    ]
    second = client.chat.completions.create(
        model="default",
        messages=messages,
        tools=TOOLS,
        tool_choice="auto",
        temperature=0,
        max_tokens=24,
    )
    reply = second.choices[0]
    assert reply.finish_reason in ("stop", "length", "tool_calls")
    if reply.finish_reason == "tool_calls":
        for c in reply.message.tool_calls or []:
            _valid(c)
    else:
        assert reply.message.content and not reply.message.tool_calls
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_named_tool_streams_into_the_sdk_helper(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="default",
        messages=[{"role": "user", "content": "What time is it in Rome?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=40,
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert calls is not None and [c.function.name for c in calls] == ["get_time"]
    _valid(calls[0])
