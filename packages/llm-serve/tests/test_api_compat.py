"""What vLLM users send: the accept-list of request fields, /tokenize, /detokenize, /version.
The tiny model's byte tokenizer makes token counts exact (one token per byte)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm_serve import ServerSettings, build_app
from paged_engine import EngineConfig

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "he"}]


@pytest.fixture(scope="module")
def url(tiny_model: str, in_process_server: Any) -> Iterator[str]:
    config = EngineConfig(model=tiny_model, device="cpu", num_blocks=256)
    server = in_process_server(build_app(config, ServerSettings("tiny")))
    deadline = time.monotonic() + 120
    while httpx.get(f"{server.url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.2)
    yield server.url
    server.stop()


def _post(url: str, route: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}{route}", json={"model": "tiny", **body}, timeout=60)


def _chat(url: str, **body: Any) -> httpx.Response:
    return _post(url, "/v1/chat/completions", messages=MESSAGES, max_tokens=2, **body)


def _refused(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_vllm_defaults_are_accepted_and_other_values_refused(url: str) -> None:
    r = _chat(url, min_tokens=0, priority=0, skip_special_tokens=True, add_generation_prompt=True)
    assert r.status_code == 200, r.text
    _refused(_chat(url, priority=1), "priority")
    _refused(_chat(url, min_tokens=3), "min_tokens")  # more than max_tokens: it reached the engine
    assert _chat(url, min_tokens=2, skip_special_tokens=False).status_code == 200
    # A tool field is implemented: any value passes, with or without tools.
    assert _chat(url, parallel_tool_calls=False).status_code == 200
    _refused(_chat(url, stream=True, prompt_logprobs=1), "prompt_logprobs")


def test_chat_template_options_shape_the_prompt(url: str) -> None:
    def prompt_tokens(**body: Any) -> int:
        r = _chat(url, **body)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens"])

    transcript = len("user: hi\nassistant: he\n")
    assert prompt_tokens(add_generation_prompt=False) == transcript
    assert prompt_tokens() == transcript + len("assistant: ")
    assert prompt_tokens(continue_final_message=True) == transcript - 1
    _refused(_chat(url, continue_final_message=True, add_generation_prompt=True), "messages")
    # chat_template_kwargs reach the template: one that clashes with its own arguments fails.
    assert _chat(url, chat_template_kwargs={"enable_thinking": False}).status_code == 200
    _refused(_chat(url, chat_template_kwargs={"tokenize": True}), "messages")


def test_prompt_logprobs(url: str) -> None:
    r = _post(url, "/v1/completions", prompt="abcd", max_tokens=1, prompt_logprobs=2)
    assert r.status_code == 200, r.text
    rows = r.json()["choices"][0]["prompt_logprobs"]
    assert len(rows) == 4 and rows[0] is None
    for pos, row in enumerate(rows[1:], start=1):
        actual = str(ord("abcd"[pos]))
        assert actual in row and 2 <= len(row) <= 3
        assert row[actual]["decoded_token"] == "abcd"[pos]
        assert all(v["logprob"] <= 0 for v in row.values())
    chat = _chat(url, prompt_logprobs=0).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_tokenize_detokenize_version(url: str) -> None:
    r = _post(url, "/tokenize", prompt="héllo")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == list("héllo".encode()) and body["count"] == 6
    assert body["max_model_len"] > 6 and body["token_strs"] is None
    chat = _post(url, "/tokenize", messages=MESSAGES, add_generation_prompt=False).json()
    assert bytes(chat["tokens"]).decode() == "user: hi\nassistant: he\n"
    r = _post(url, "/detokenize", tokens=body["tokens"])
    assert r.status_code == 200 and r.json() == {"prompt": "héllo"}
    _refused(_post(url, "/detokenize", tokens=[1, 10**6]), "tokens")
    _refused(_post(url, "/tokenize", prompt="a", messages=MESSAGES), "prompt")
    _refused(_post(url, "/tokenize"), "prompt")
    assert _post(url, "/tokenize", prompt="a", frobnicate=1).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={"model": "other", "prompt": "a"}).status_code == 404
    version = httpx.get(f"{url}/version").json()["version"]
    assert isinstance(version, str) and version[0].isdigit()
