"""A real server with small limits, probed as a hostile client would: every request that once
hurt the server (out-of-range numbers, huge stop lists, slow or vanishing clients, requests
that can never be admitted, prompts that do not fit) gets a clear 4xx, and the server keeps
serving everyone else."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm_serve.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SEED_MAX

ServerProcess = Any  # conftest.ServerProcess

MAX_MODEL_LEN = 256
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def server(tiny_model: str, start_server: Any) -> Iterator[ServerProcess]:
    proc = start_server(
        [
            tiny_model,
            "--device",
            "cpu",
            "--num-blocks",
            "64",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--max-queue",
            str(MAX_QUEUE),
            "--header-timeout",
            "1",
            "--body-timeout",
            "1",
            "--max-connections",
            "6",
            "--log-level",
            "info",
        ]
    )
    yield proc
    proc.stop()


def _post(server: ServerProcess, body: Any, path: str = "completions") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json=body, timeout=60)


def _error(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _engine_idle(server: ServerProcess) -> dict[str, Any]:
    """The engine's stats once nothing is running or waiting (requests are not leaked)."""
    deadline = time.monotonic() + 20
    while True:
        s: dict[str, Any] = httpx.get(f"{server.url}/v1/cache/stats", timeout=30).json()
        if s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_blocks_used"] == 0:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.1)


def _works(server: ServerProcess) -> None:
    r = _post(server, {"model": "tiny", "prompt": "still fine", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert server.healthy()


BASE = {"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": 1}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**BASE, "top_k": 2**63}, "top_k"),  # finding 1: once killed the engine thread
        ({**BASE, "seed": 2**64}, "seed"),  # finding 2: once leaked a request at 100% CPU
        ({**BASE, "seed": -(2**63) - 1}, "seed"),
        ({**BASE, "stop": [""]}, "stop[0]"),
        ({**BASE, "stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop"),  # finding 3
        ({**BASE, "stop": ["s" * (MAX_STOP_STRING_CHARS + 1)]}, "stop[0]"),
        ({**BASE, "stop": "s" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
        ({**BASE, "stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({**BASE, "max_tokens": 2**70}, "max_tokens"),
        ({**BASE, "n": 129}, "n"),
        ({**BASE, "logprobs": 21}, "logprobs"),
        ({**BASE, "prompt": [[1, 2], [3, "a"]]}, "prompt[1][1]"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, str) else None,
)
def test_out_of_range_values_get_400_naming_the_field(
    server: ServerProcess, body: dict[str, Any], param: str
) -> None:
    err = _error(_post(server, body))
    assert err["param"] == param, err
    _works(server)
    _engine_idle(server)


@pytest.mark.parametrize("raw", [b"Infinity", b"-Infinity", b"NaN", b"1e999"])
def test_non_finite_numbers_get_400_naming_the_field(server: ServerProcess, raw: bytes) -> None:
    body = b'{"model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": ' + raw + b"}"
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert _error(r)["param"] == "temperature"


def test_a_lone_surrogate_escape_gets_a_clear_message(server: ServerProcess) -> None:
    body = b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}'
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    err = _error(r)
    assert err["code"] == "invalid_json"
    assert "surrogate" in err["message"] and "hex escape" not in err["message"]


def test_the_largest_valid_seed_works_for_every_choice(server: ServerProcess) -> None:
    r = _post(server, {**BASE, "seed": SEED_MAX, "n": 3, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 3
    _engine_idle(server)


def test_a_max_size_stop_list_is_served(server: ServerProcess) -> None:
    stops = [chr(0x4E00 + i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)]
    r = _post(server, {**BASE, "stop": stops, "max_tokens": 20, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


# -- fairness: requests that can never be admitted, full queues ---------------------------------


def test_more_choices_than_the_queue_holds_get_400_not_429(server: ServerProcess) -> None:
    err = _error(_post(server, {**BASE, "n": MAX_QUEUE + 1}))
    assert err["code"] == "too_many_choices" and err["param"] == "n"
    assert f"--max-queue {MAX_QUEUE}" in err["message"]
    # a batch of prompts counts every prompt's choices
    batch = {**BASE, "prompt": ["a", "b", "c"], "n": 3}
    assert _error(_post(server, batch))["code"] == "too_many_choices"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": MAX_QUEUE + 1}
    assert _error(_post(server, chat, "chat/completions"))["code"] == "too_many_choices"
    # exactly the queue's size is fine
    assert _post(server, {**BASE, "n": MAX_QUEUE}).status_code == 200


# -- OpenAI-exact limits -------------------------------------------------------------------------


def test_max_tokens_beyond_the_context_gets_context_length_exceeded(
    server: ServerProcess,
) -> None:
    prompt = "y" * 100  # byte tokenizer: 100 tokens
    err = _error(_post(server, {**BASE, "prompt": prompt, "max_tokens": MAX_MODEL_LEN}))
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert str(MAX_MODEL_LEN) in err["message"]
    chat = {
        "model": "tiny",
        "messages": [{"role": "user", "content": prompt}],
        "max_completion_tokens": MAX_MODEL_LEN,
    }
    err = _error(_post(server, chat, "chat/completions"))
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_completion_tokens"
    # what fits is served in full, and an unset max_tokens runs to the context's end
    r = _post(
        server,
        {**BASE, "prompt": prompt, "max_tokens": MAX_MODEL_LEN - 100, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - 100


def test_stream_options_without_stream_gets_400(server: ServerProcess) -> None:
    body = {**BASE, "stream_options": {"include_usage": True}}
    assert _error(_post(server, body))["param"] == "stream_options"
    assert _error(_post(server, {**body, "stream": False}))["param"] == "stream_options"
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    err = _error(_post(server, {**chat, "stream_options": {}}, "chat/completions"))
    assert err["param"] == "stream_options"
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        assert any('"usage"' in line for line in r.iter_lines())


def test_models_root_is_not_a_file_path(server: ServerProcess) -> None:
    card = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]
    assert card["root"] == "tiny"


# -- slow and vanishing clients ------------------------------------------------------------------


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes ``sock``; (closed in time, what it sent)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_silent_and_slow_header_clients_are_disconnected(server: ServerProcess) -> None:
    silent = _connect(server)
    partial = _connect(server)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\n")
    for sock in (silent, partial):
        with sock:
            closed, _ = _closed_within(sock, 5.0)  # --header-timeout 1
            assert closed
    _works(server)


def test_a_slow_body_gets_408_and_the_connection_closes(server: ServerProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 200\r\n\r\n{"model": '
        )
        closed, got = _closed_within(sock, 5.0)  # --body-timeout 1
        assert closed
        assert got.startswith(b"HTTP/1.1 408"), got[:200]
    _works(server)


def test_a_disconnect_mid_body_is_one_log_line(server: ServerProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"model": "ti'
        )
    deadline = time.monotonic() + 10
    while "disconnected before sending the whole body" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    log = server.log()
    assert log.count("disconnected before sending the whole body") == 1
    assert "Traceback" not in log and "unhandled error" not in log
    _works(server)


def test_connections_beyond_the_cap_get_503(server: ServerProcess) -> None:
    idle = [_connect(server) for _ in range(6)]  # --max-connections 6
    try:
        time.sleep(0.2)
        r = httpx.get(f"{server.url}/v1/models", timeout=10)
        assert r.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/v1/models", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_no_request_leaked_after_all_of_the_above(server: ServerProcess) -> None:
    s = _engine_idle(server)
    assert s["num_blocks_total"] == s["num_blocks_free"] + s["num_blocks_cached"]
    assert json.dumps(s)  # plain JSON
