"""Units of the operational parts: keys and tenants, the request guard, metrics, the log line,
and the benchmark's workload and figures."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest

from llm_serve.async_engine import AsyncEngine
from llm_serve.bench import (
    BenchConfig,
    BenchError,
    RequestResult,
    format_report,
    make_workload,
    percentile,
    save_results,
    summarize,
)
from llm_serve.metrics import ServerMetrics, StatsLogger
from llm_serve.state import ServerSettings, ServerState
from llm_serve.tenancy import (
    TENANT_SCOPE_KEY,
    RequestGuard,
    keys_from_env,
    tenant_id,
    validate_api_key,
)
from paged_engine import EngineStats, LLMEngine, RequestOutput


def _stats(**kw: Any) -> EngineStats:
    base: dict[str, Any] = {
        "num_blocks_total": 100,
        "num_blocks_used": 10,
        "num_blocks_free": 80,
        "num_blocks_cached": 10,
        "kv_usage": 0.1,
        "num_running": 0,
        "num_waiting": 0,
        "num_preemptions": 0,
        "num_finished": 0,
        "prompt_tokens_total": 0,
        "generation_tokens_total": 0,
    }
    base.update(kw)
    return EngineStats(**base)


def _unused_engine() -> AsyncEngine:
    def never() -> LLMEngine:
        raise AssertionError("not started")

    return AsyncEngine(never)


# -- keys and tenants ---------------------------------------------------------------------------


def test_keys_and_tenants() -> None:
    assert len(tenant_id("k1")) == 16 and tenant_id("k1") == tenant_id("k1")
    assert tenant_id("k1") != tenant_id("k2")
    assert keys_from_env({"LLM_SERVE_API_KEYS": " a, b ,,c "}) == ["a", "b", "c"]
    assert keys_from_env({}) == []
    for bad in ("", "has space", "tab\tkey", "ключ"):
        with pytest.raises(ValueError) as err:
            validate_api_key(bad)
        assert not bad or bad not in str(err.value)  # never echoes the key
    settings = ServerSettings(model_name="m", api_keys=("secret-1", "secret-2", "secret-1"))
    assert settings.api_keys == ("secret-1", "secret-2")
    assert "secret" not in repr(settings)
    with pytest.raises(TypeError):
        ServerSettings(model_name="m", api_keys="secret-1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ServerSettings(model_name="m", max_request_bytes=0)


def test_cache_namespace() -> None:
    class FakeRequest:
        def __init__(self, scope: dict[str, Any]) -> None:
            self.scope = scope

    open_state = ServerState(_unused_engine(), ServerSettings(model_name="m"))
    assert open_state.cache_namespace(FakeRequest({}), "") == b""  # type: ignore[arg-type]
    assert open_state.cache_namespace(FakeRequest({}), "s") == b"s"  # type: ignore[arg-type]
    keyed = ServerState(_unused_engine(), ServerSettings(model_name="m", api_keys=("k",)))
    req = FakeRequest({TENANT_SCOPE_KEY: tenant_id("k")})
    assert keyed.cache_namespace(req, "") == tenant_id("k")  # type: ignore[arg-type]
    assert keyed.cache_namespace(req, "s") == tenant_id("k") + b"s"  # type: ignore[arg-type]
    with pytest.raises(Exception, match="API key"):
        keyed.cache_namespace(FakeRequest({}), "")  # type: ignore[arg-type]


def test_request_guard() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append({"tenant": scope.get(TENANT_SCOPE_KEY), "body": body})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = RequestGuard(app, ["key-1", "key-2"], max_request_bytes=100)

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=guard)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            auth = {"Authorization": "Bearer key-2"}
            return [
                await c.get("/health"),
                await c.get("/v1/models"),
                await c.get("/v1/models", headers={"Authorization": "Bearer key-3"}),
                await c.get("/v1/models", headers={"Authorization": "Basic key-2"}),
                await c.post("/v1/completions", content=b"x" * 100, headers=auth),
                await c.post("/v1/completions", content=b"x" * 101, headers=auth),
            ]

    health, none, wrong, basic, fits, big = asyncio.run(go())
    assert health.status_code == 200 and seen[0]["tenant"] is None
    for r in (none, wrong, basic):
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert fits.status_code == 200
    assert seen[-1] == {"tenant": tenant_id("key-2"), "body": b"x" * 100}
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert len(seen) == 2


# -- metrics and the log line ------------------------------------------------------------------------


def test_metrics_registry_per_server_and_observations() -> None:
    a, b = ServerMetrics(_unused_engine()), ServerMetrics(_unused_engine())  # no name clash
    out = RequestOutput(
        request_id="r",
        prompt_token_ids=[1, 2],
        token_ids=[3, 4, 5],
        finished=True,
        finish_reason="length",
        arrival_time=10.0,
        first_scheduled_time=10.25,
        first_token_time=10.5,
        finish_time=11.5,
    )
    a.observe(out)
    a.observe(RequestOutput(request_id="x", prompt_token_ids=[1], finish_reason="abort"))
    text = generate_latest(a.registry).decode()
    assert "llm_serve:time_to_first_token_seconds_count 1.0" in text
    assert "llm_serve:time_to_first_token_seconds_sum 0.5" in text
    assert "llm_serve:time_per_output_token_seconds_sum 0.5" in text
    assert "llm_serve:e2e_request_latency_seconds_sum 1.5" in text
    assert "llm_serve:request_queue_time_seconds_sum 0.25" in text
    # engine figures appear only once the model is loaded
    assert "llm_serve:prefix_cache_hits_total" not in text
    assert "llm_serve:time_to_first_token_seconds_count 0.0" in generate_latest(b.registry).decode()


def test_stats_log_line() -> None:
    log = StatsLogger()
    assert log.line(0.0, _stats(), 0) is None  # the first snapshot only sets the baseline
    assert log.line(5.0, _stats(), 0) is None  # idle: nothing to say
    busy = _stats(
        prompt_tokens_total=1000,
        generation_tokens_total=50,
        num_running=3,
        kv_usage=0.25,
        prefix_cache_queried_tokens=1000,
        prefix_cache_hit_tokens=400,
    )
    line = log.line(10.0, busy, 2)
    assert line is not None
    for part in (
        "prompt throughput 200.0 tok/s",
        "generation throughput 10.0 tok/s",
        "running 3, waiting 2",
        "KV cache usage 25.0%",
        "prefix cache hit rate 40.0%",
    ):
        assert part in line, line
    assert log.line(15.0, busy, 0) == (
        "prompt throughput 0.0 tok/s, generation throughput 0.0 tok/s; running 3, waiting 0; "
        "KV cache usage 25.0%; prefix cache hit rate n/a (since start 40.0%)"
    )


# -- bench -------------------------------------------------------------------------------------------


def test_percentile_and_workload() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 50))
    cfg = BenchConfig(
        url="http://h:1/v1/", num_prefixes=3, prefix_len=20, suffix_len=5, num_requests=7
    )
    assert cfg.base_url == "http://h:1"
    work = make_workload(cfg)
    assert work == make_workload(cfg)  # seeded
    assert [k for k, _, _ in work] == [0, 1, 2, 0, 1, 2, 0]
    assert work[0][1] == work[3][1] != work[1][1]
    assert all(len(p.split()) == 20 and len(s.split()) == 5 for _, p, s in work)
    assert len({s for _, _, s in work}) == 7
    assert make_workload(BenchConfig(url="u", seed=1, num_requests=2)) != make_workload(
        BenchConfig(url="u", seed=2, num_requests=2)
    )
    for bad in ({"num_requests": 0}, {"request_rate": 0.0}, {"prefix_len": 0, "suffix_len": 0}):
        with pytest.raises(ValueError):
            BenchConfig(url="u", **bad)  # type: ignore[arg-type]


def _results() -> list[RequestResult]:
    return [
        RequestResult(
            index=i,
            prefix=0,
            start=0.1 * i,
            end=0.1 * i + 1.0,
            ok=True,
            ttft=0.2,
            itl=[0.1] * 8,
            chunk_times=[0.1 * i + 0.2 + 0.1 * j for j in range(9)],
            output_tokens=9,
            prompt_tokens=100,
            cached_tokens=50 if i else 0,
        )
        for i in range(4)
    ] + [RequestResult(index=4, prefix=0, error="HTTP 500: boom")]


def test_summary_report_and_files(tmp_path: Path) -> None:
    cfg = BenchConfig(url="http://h", api_key="sk-secret", num_requests=5)
    summary = summarize(cfg, "m", 2.0, _results())
    assert summary["completed"] == 4 and summary["failed"] == 1
    assert summary["request_throughput"] == 2.0
    assert summary["output_token_throughput"] == 18.0
    assert summary["cached_token_share"] == 150 / 400
    assert summary["ttft"]["mean_ms"] == pytest.approx(200.0)
    assert summary["tpot"]["p50_ms"] == pytest.approx(100.0)
    assert summary["e2e"]["p99_ms"] == pytest.approx(1000.0)
    assert summary["errors"] == ["HTTP 500: boom"]
    assert "api_key" not in summary["config"]
    report = format_report(summary)
    assert "Cached prompt tokens (server):   150 (37.5%)" in report
    assert "TTFT" in report and "errors: HTTP 500: boom" in report
    json.dumps(summary)  # JSON-ready (no inf / nan)

    paths = save_results(tmp_path / "out", summary, _results())
    data = json.loads(paths[0].read_text())
    assert data["summary"]["completed"] == 4 and len(data["requests"]) == 5
    assert "sk-secret" not in paths[0].read_text()
    assert paths[1].read_bytes().startswith(b"\x89PNG")


def test_save_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BenchError, match="llm-serve\\[plot\\]"):
        save_results(tmp_path, {}, [])
    assert not any(tmp_path.iterdir())
