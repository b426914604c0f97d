"""End to end: a real ``llm-serve serve`` process driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

MAX_MODEL_LEN = 256


ServerProcess = Any  # conftest.ServerProcess


@pytest.fixture(scope="module")
def server(tiny_model: str, start_server: Any) -> Iterator[ServerProcess]:
    proc = start_server(
        [
            tiny_model,
            "--device",
            "cpu",
            "--num-blocks",
            "512",
            "--max-model-len",
            str(MAX_MODEL_LEN),
        ]
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client: openai.OpenAI, content: str, **kw: Any) -> Any:
    if "ignore_eos" in kw:  # not an OpenAI parameter: the client sends it in extra_body
        kw["extra_body"] = {**kw.get("extra_body", {}), "ignore_eos": kw.pop("ignore_eos")}
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], **kw
    )


def test_models_and_health(server: ServerProcess, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_chat_and_completion(client: openai.OpenAI) -> None:
    r = chat(client, "Hello there", max_tokens=8, temperature=0, ignore_eos=True)
    assert r.object == "chat.completion"
    assert r.model == "tiny"
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == len(b"user: Hello there\nassistant: ")
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens is not None

    c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0)
    assert c.object == "text_completion"
    assert c.usage is not None and c.usage.prompt_tokens == len("Once upon")
    assert c.usage.prompt_tokens_details is not None
    assert c.choices[0].finish_reason in ("length", "stop")
    # max_completion_tokens is the chat name of max_tokens
    r = chat(client, "Hi", max_completion_tokens=3, ignore_eos=True)
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_stream_equals_non_stream_under_greedy(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = chat(client, "Tell me a story", **kw)
    chunks = list(
        chat(client, "Tell me a story", stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens == 24
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens is not None

    full_c = client.completions.create(model="tiny", prompt="abc", **kw)
    stream_c = list(client.completions.create(model="tiny", prompt="abc", stream=True, **kw))
    assert "".join(c.choices[0].text for c in stream_c) == full_c.choices[0].text
    assert stream_c[-1].choices[0].finish_reason == "length"


def test_raw_stream_ends_with_done(server: ServerProcess) -> None:
    body = {
        "model": "tiny",
        "prompt": "x",
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2].removeprefix("data: "))["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 32, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    a = client.completions.create(model="tiny", prompt="seeded", seed=7, **kw)
    b = client.completions.create(model="tiny", prompt="seeded", seed=7, **kw)
    c = client.completions.create(model="tiny", prompt="seeded", seed=8, **kw)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text


def test_n_choices_are_seeded_seed_plus_i(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 16, "temperature": 1.0, "extra_body": {"ignore_eos": True}}
    both = chat(client, "pick", n=2, seed=3, **kw)
    assert [c.index for c in both.choices] == [0, 1]
    one = chat(client, "pick", seed=3, **kw)
    two = chat(client, "pick", seed=4, **kw)
    assert both.choices[0].message.content == one.choices[0].message.content
    assert both.choices[1].message.content == two.choices[0].message.content
    assert both.usage is not None
    assert both.usage.completion_tokens == 32
    assert both.usage.prompt_tokens == one.usage.prompt_tokens  # type: ignore[union-attr]

    streamed = list(chat(client, "pick", n=2, seed=3, stream=True, **kw))
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in both.choices]


def test_completion_prompt_forms(client: openai.OpenAI) -> None:
    ids = list(b"token ids")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(
        model="tiny", prompt="token ids", max_tokens=6, temperature=0
    )
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(
        model="tiny", prompt=["one", "two"], n=2, max_tokens=4, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.usage is not None and batch.usage.prompt_tokens == 6


def test_32_concurrent_streaming_clients(server: ServerProcess) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"client {i}"}],
            max_tokens=16,
            stream=True,
            seed=i,
            extra_body={"ignore_eos": True},
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    assert all(finish == "length" for _text, finish in results)


def test_client_disconnect_mid_stream(server: ServerProcess, client: openai.OpenAI) -> None:
    body = {
        "model": "tiny",
        "prompt": "never mind",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    for _ in range(3):
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert got[0].startswith("data: ")
        # closing the response drops the connection mid-stream
    assert server.healthy()
    r2 = chat(client, "still there?", max_tokens=4, ignore_eos=True)
    assert r2.choices[0].finish_reason == "length"


# -- bad inputs -----------------------------------------------------------------------------------

BASE_CHAT: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
LONG = "x" * (MAX_MODEL_LEN + 10)

BAD_INPUTS: list[tuple[str, str, Any, int, str | None]] = [
    # (id, path, body (bytes = raw), status, param)
    ("malformed-json", "chat/completions", b'{"model": "tiny", "messages": [', 400, None),
    ("not-an-object", "completions", b"[1, 2]", 400, None),
    ("empty-body", "completions", b"", 400, None),
    ("missing-messages", "chat/completions", {"model": "tiny"}, 400, "messages"),
    ("missing-prompt", "completions", {"model": "tiny"}, 400, "prompt"),
    ("max-tokens-string", "chat/completions", {**BASE_CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    (
        "temperature-string",
        "chat/completions",
        {**BASE_CHAT, "temperature": "hot"},
        400,
        "temperature",
    ),
    ("messages-string", "chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("stream-int", "chat/completions", {**BASE_CHAT, "stream": 1}, 400, "stream"),
    ("max-tokens-zero", "chat/completions", {**BASE_CHAT, "max_tokens": 0}, 400, "max_tokens"),
    (
        "temperature-negative",
        "chat/completions",
        {**BASE_CHAT, "temperature": -1},
        400,
        "temperature",
    ),
    ("n-zero", "chat/completions", {**BASE_CHAT, "n": 0}, 400, "n"),
    ("n-zero-completions", "completions", {"model": "tiny", "prompt": "a", "n": 0}, 400, "n"),
    ("empty-messages", "chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("empty-prompt", "completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("prompt-too-long", "completions", {"model": "tiny", "prompt": LONG}, 400, "prompt"),
    (
        "chat-too-long",
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": LONG}]},
        400,
        "messages",
    ),
    ("token-out-of-vocab", "completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ("unknown-model", "chat/completions", {**BASE_CHAT, "model": "gpt-9"}, 404, "model"),
    ("unknown-model-completions", "completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    (
        "tools",
        "chat/completions",
        {**BASE_CHAT, "tools": [{"type": "function"}]},
        400,
        "tools[0].function",
    ),
    (
        "response-format-unknown",
        "chat/completions",
        {**BASE_CHAT, "response_format": {"type": "xml"}},
        400,
        "response_format",
    ),
    ("logit-bias", "chat/completions", {**BASE_CHAT, "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("unknown-field", "chat/completions", {**BASE_CHAT, "frobnicate": 3}, 400, "frobnicate"),
    ("echo", "completions", {"model": "tiny", "prompt": "a", "echo": True}, 400, "echo"),
    ("best-of", "completions", {"model": "tiny", "prompt": "a", "best_of": 3}, 400, "best_of"),
    (
        "bad-role",
        "chat/completions",
        {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages[0].role",
    ),
    (
        "image-part",
        "chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
        },
        400,
        "messages[0].content[0].type",
    ),
    (
        "stream-options-unknown",
        "chat/completions",
        {**BASE_CHAT, "stream": True, "stream_options": {"continuous_usage_stats": True}},
        400,
        "stream_options.continuous_usage_stats",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS],
)
def test_bad_input_gets_openai_error(
    server: ServerProcess, path: str, body: Any, status: int, param: str | None
) -> None:
    url = f"{server.url}/v1/{path}"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param
    assert server.healthy()


def test_errors_through_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.status_code == 404
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, "hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="tool name"):
        chat(client, "hi", tools=[{"type": "function", "function": {"name": "bad name!"}}])
    with pytest.raises(openai.NotFoundError):
        client.with_options(base_url=client.base_url.copy_with(path="/nope/")).models.list()


def test_null_empty_and_default_values_pass(server: ServerProcess) -> None:
    body = {
        **BASE_CHAT,
        "max_tokens": 2,
        "tools": [],
        "tool_choice": None,
        "response_format": {"type": "text"},
        "logit_bias": {},
        "functions": None,
        "parallel_tool_calls": True,
        "store": False,
        "metadata": {},
        "user": "someone",
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "stop": [],
        "stop_token_ids": [],
        "logprobs": False,
        "seed": None,
        "stream": False,
        "stream_options": None,
        "cache_salt": None,
    }
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


SAMPLING_CASES: list[tuple[str, Any]] = [
    # (request field, a value that is not the default)
    ("top_p", 0.5),
    ("top_k", 5),
    ("min_p", 0.1),
    ("presence_penalty", 0.5),
    ("frequency_penalty", 0.5),
    ("repetition_penalty", 1.2),
    ("stop", ["zz"]),
    ("stop_token_ids", [5]),
    ("logprobs", True),
]


@pytest.mark.parametrize(("name", "value"), SAMPLING_CASES)
def test_sampling_field_is_accepted(server: ServerProcess, name: str, value: Any) -> None:
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={**BASE_CHAT, "max_tokens": 4, name: value},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert server.healthy()


def test_stop_strings(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    full = client.completions.create(model="tiny", prompt="stop here", **kw).choices[0].text
    # a two-character stop string from the middle of the greedy text (no replacement chars)
    starts = [i for i in range(2, len(full) - 1) if "\ufffd" not in full[i : i + 2]]
    assert starts, f"need some clean text to cut: {full!r}"
    stop = full[starts[0] : starts[0] + 2]
    expected = full[: full.index(stop)]
    cut = client.completions.create(model="tiny", prompt="stop here", stop=[stop], **kw)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == expected
    streamed = list(
        client.completions.create(model="tiny", prompt="stop here", stop=stop, stream=True, **kw)
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    chat_full = chat(client, "stop", max_tokens=40, temperature=0, ignore_eos=True)
    text = chat_full.choices[0].message.content
    starts = [i for i in range(2, len(text) - 1) if "\ufffd" not in text[i : i + 2]]
    if starts:
        stop = text[starts[0] : starts[0] + 2]
        r = chat(client, "stop", max_tokens=40, temperature=0, ignore_eos=True, stop=stop)
        assert r.choices[0].message.content == text[: text.index(stop)]
        assert r.choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    r = chat(
        client, "lp", max_tokens=5, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    c = client.completions.create(
        model="tiny",
        prompt="lp",
        max_tokens=4,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = c.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 4 and len(lp.top_logprobs) == 4
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    streamed = list(
        client.completions.create(
            model="tiny",
            prompt="lp",
            max_tokens=4,
            temperature=0,
            logprobs=3,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    tokens = [
        t
        for ch in streamed
        for t in (ch.choices[0].logprobs.tokens if ch.choices[0].logprobs else [])
    ]
    assert tokens == lp.tokens


def test_cached_tokens_on_repeated_system_prompt(client: openai.OpenAI) -> None:
    system = "You are a helpful assistant. " * 4  # > 100 byte tokens: several full blocks
    msgs = [{"role": "system", "content": system}]
    first = client.chat.completions.create(
        model="tiny", messages=[*msgs, {"role": "user", "content": "one"}], max_tokens=2
    )
    second = client.chat.completions.create(
        model="tiny", messages=[*msgs, {"role": "user", "content": "two"}], max_tokens=2
    )
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens > 0
    assert details.cached_tokens <= second.usage.prompt_tokens
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[*msgs, {"role": "user", "content": "three"}],
            max_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) > 0


def test_cache_salt_separates_cached_prefixes(server: ServerProcess) -> None:
    system = "Salted system prompt that spans several blocks. " * 3

    def cached(salt: str | None, user: str) -> int:
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "max_tokens": 1,
        }
        if salt is not None:
            body["cache_salt"] = salt
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert cached("tenant-a", "one") == 0
    assert cached("tenant-a", "two") > 0
    assert cached("tenant-b", "three") == 0
    assert cached(None, "four") == 0
