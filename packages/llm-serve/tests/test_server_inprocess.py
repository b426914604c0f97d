"""The app served by uvicorn inside the test process, so the engine itself can be inspected:
health before load, blocks freed on client disconnect, request timeouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm_serve import ServerSettings, build_app
from llm_serve.async_engine import AsyncEngine
from paged_engine import EngineConfig, EngineStats, LLMEngine


@pytest.fixture(scope="module")
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture(scope="module")
def served(tiny_model: str, in_process_server: Any, gate: threading.Event) -> Iterator[Any]:
    def load() -> LLMEngine:
        gate.wait(60)  # the model "loads" until the test opens the gate
        return LLMEngine(EngineConfig(model=tiny_model, device="cpu", num_blocks=512))

    engine = AsyncEngine(load)
    app = build_app(engine, ServerSettings(model_name="tiny", max_queue=8, request_timeout=1.0))
    server = in_process_server(app)
    server.engine = engine
    yield server
    gate.set()
    server.stop()


def _idle(engine: AsyncEngine, timeout: float = 10.0) -> EngineStats:
    """Wait until no request holds blocks; return the stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        assert stats is not None
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_blocks_used == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still hold blocks: {stats}")
        time.sleep(0.05)


def test_health_is_503_until_the_model_is_loaded(served: Any, gate: threading.Event) -> None:
    r = httpx.get(f"{served.url}/health")
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{served.url}/v1/chat/completions", json=body)
    assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    assert httpx.get(f"{served.url}/v1/models").json()["data"][0]["id"] == "tiny"
    gate.set()
    deadline = time.monotonic() + 60
    while httpx.get(f"{served.url}/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_client_disconnect_mid_stream_frees_blocks(served: Any) -> None:
    engine: AsyncEngine = served.engine
    assert engine.wait_ready(60)
    body = {
        "model": "tiny",
        "prompt": "a long prompt " * 8,
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        stats = engine.stats()
        assert stats is not None and stats.num_running == 1 and stats.num_blocks_used > 0
    # the connection is closed mid-stream: the request is aborted and its blocks released
    stats = _idle(engine)
    assert stats.num_blocks_free + stats.num_blocks_cached == stats.num_blocks_total


def test_client_disconnect_while_waiting_for_a_full_answer(served: Any) -> None:
    engine: AsyncEngine = served.engine
    assert engine.wait_ready(60)
    body = {"model": "tiny", "prompt": "patience", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json=body, timeout=0.3)
    _idle(engine)


def test_request_timeout(served: Any) -> None:
    engine: AsyncEngine = served.engine
    assert engine.wait_ready(60)
    body = {"model": "tiny", "prompt": "slow", "max_tokens": 4000, "ignore_eos": True}
    t0 = time.monotonic()
    r = httpx.post(f"{served.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 5
    _idle(engine)
    r = httpx.post(f"{served.url}/v1/completions", json={**body, "stream": True}, timeout=30)
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]"
    assert '"request_timeout"' in events[-2]
    _idle(engine)
    r = httpx.post(f"{served.url}/v1/completions", json={**body, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200


def test_engine_calls_and_finish_hooks(served: Any) -> None:
    """Extension points for routes that need the engine itself (cache stats, metrics)."""
    import asyncio

    engine: AsyncEngine = served.engine
    assert engine.wait_ready(60)
    loop = served.app.state.llm.loop

    def run(fn: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(engine.call(fn), loop).result(30)

    assert run(lambda e: e.max_model_len) == 4096
    with pytest.raises(ZeroDivisionError):
        run(lambda e: 1 // 0)
    finished: list[Any] = []
    engine.finish_hooks.append(finished.append)
    try:
        body = {"model": "tiny", "prompt": "hook", "max_tokens": 3, "ignore_eos": True}
        assert httpx.post(f"{served.url}/v1/completions", json=body, timeout=30).status_code == 200
    finally:
        engine.finish_hooks.remove(finished.append)
    assert [(len(o.token_ids), o.finish_reason) for o in finished] == [(3, "length")]
    assert finished[0].first_token_time is not None
