"""Fault injection through a served engine: a request whose sampling fails gets an error while
other clients are served; an engine whose forward pass keeps failing makes ``/health`` fail and
``run_server`` return 1, so a supervisor restarts the process."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx
import pytest

from llm_serve import ServerSettings, build_app
from llm_serve.server import run_server
from paged_engine import EngineConfig, LLMEngine


def _engine(tiny_model: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_model, device="cpu", num_blocks=256))


def _complete(url: str, prompt: str, **kw: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_a_failing_request_does_not_hurt_others(tiny_model: str, in_process_server: Any) -> None:
    engine = _engine(tiny_model)
    # Sampling raises for any request whose prompt starts with the poisoned byte.
    poisoned = engine.tokenizer.encode("\x01")[0]

    def hook(stage: str, request_id: str) -> None:
        seq = engine._requests.get(request_id)
        if stage == "sample" and seq is not None and seq.prompt_token_ids[0] == poisoned:
            raise RuntimeError("injected sampler fault")

    engine.fault_hook = hook
    server = in_process_server(build_app(engine, ServerSettings(model_name="tiny")))
    try:
        results: dict[str, httpx.Response] = {}

        def send(name: str, prompt: str) -> None:
            results[name] = _complete(server.url, prompt)

        threads = [
            threading.Thread(target=send, args=(f"good{i}", f"hello {i}")) for i in range(3)
        ] + [threading.Thread(target=send, args=("bad", "\x01 poisoned"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results["bad"].status_code == 500, results["bad"].text
        assert "injected sampler fault" in results["bad"].json()["error"]["message"]
        for i in range(3):
            r = results[f"good{i}"]
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert _complete(server.url, "after").status_code == 200
    finally:
        server.stop()


def test_engine_that_cannot_continue_stops_the_server(
    tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(tiny_model)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "execute", broken)
    app = build_app(engine, ServerSettings(model_name="tiny", shutdown_timeout=0.5))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(run_server(app, port=port, log_level="critical")),
        daemon=True,
    )
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not become healthy"
        time.sleep(0.1)
    statuses = []
    for i in range(3):  # each request fails its step; the third failure in a row is fatal
        try:
            statuses.append(_complete(url, f"p{i}").status_code)
        except httpx.HTTPError:
            statuses.append(-1)  # the server is already going away
    assert statuses[0] == 500 and all(s in (500, 503, -1) for s in statuses), statuses
    thread.join(30)
    assert not thread.is_alive(), "the server kept running on a dead engine"
    assert result == [1]
