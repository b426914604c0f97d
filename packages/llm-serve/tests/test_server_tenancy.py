"""A real server process with two API keys: authentication, per-tenant prefix caches, cache
resets, Prometheus metrics, the body size limit, and ``llm-serve bench`` against it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ServerProcess = Any  # conftest.ServerProcess

KEY_A = "sk-tenant-alpha-7f3a9c"
KEY_B = "sk-tenant-bravo-19e2d4"  # given through the environment
KEY_ADMIN = "sk-admin-5d1e0b"
MAX_BYTES = 64 * 1024
# byte tokenizer: one token per byte; 80 tokens = 5 full blocks of 16
PROMPT = "The quick brown fox jumps over the lazy dog again and again, all day long, ok?"


@pytest.fixture(scope="module")
def server(tiny_model: str, start_server: Any) -> Iterator[ServerProcess]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_SERVE_API_KEYS", f" {KEY_B} , ")
        proc = start_server(
            [
                tiny_model,
                "--device",
                "cpu",
                "--num-blocks",
                "512",
                "--max-model-len",
                "512",
                "--api-key",
                KEY_A,
                "--admin-api-key",
                KEY_ADMIN,
                "--max-request-bytes",
                str(MAX_BYTES),
            ]
        )
    yield proc
    proc.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _complete(server: ServerProcess, key: str, prompt: str = PROMPT, **kw: Any) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=_auth(key), timeout=60)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _cached(data: dict[str, Any]) -> int:
    return int(data["usage"]["prompt_tokens_details"]["cached_tokens"])


def _metrics(server: ServerProcess, key: str = KEY_ADMIN) -> dict[str, float]:
    r = httpx.get(f"{server.url}/metrics", headers=_auth(key), timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_keys_are_required_except_for_health(server: ServerProcess) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for headers in ({}, _auth("sk-wrong"), {"Authorization": KEY_A}, _auth(KEY_A + "x")):
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert KEY_A not in r.text
    for path in ("/v1/models", "/metrics", "/v1/cache/stats", "/no-such-route"):
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 401, path
    assert httpx.post(f"{server.url}/v1/cache/reset", timeout=30).status_code == 401
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    for key in (KEY_A, KEY_B):
        r = httpx.get(f"{server.url}/v1/models", headers=_auth(key), timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    # lowercase scheme is accepted too
    r = httpx.get(f"{server.url}/v1/models", headers={"authorization": f"bearer {KEY_B}"})
    assert r.status_code == 200


def test_each_key_is_its_own_cache_namespace(server: ServerProcess) -> None:
    prompt = PROMPT + " namespaces"
    assert _cached(_complete(server, KEY_A, prompt)) == 0
    assert _cached(_complete(server, KEY_A, prompt)) > 0
    # the same prompt from the other tenant finds nothing, then its own copy
    assert _cached(_complete(server, KEY_B, prompt)) == 0
    assert _cached(_complete(server, KEY_B, prompt)) > 0
    # a request's cache_salt refines its tenant's namespace
    assert _cached(_complete(server, KEY_A, prompt, cache_salt="s1")) == 0
    assert _cached(_complete(server, KEY_A, prompt, cache_salt="s1")) > 0


def test_cache_reset_empties_only_the_callers_namespace(server: ServerProcess) -> None:
    prompt = PROMPT + " reset"
    for key in (KEY_A, KEY_B):
        _complete(server, key, prompt)
        assert _cached(_complete(server, key, prompt)) > 0
    r = httpx.post(f"{server.url}/v1/cache/reset", headers=_auth(KEY_A), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["freed_blocks"] > 0 and r.json()["scope"] == "tenant"
    assert _cached(_complete(server, KEY_A, prompt)) == 0
    assert _cached(_complete(server, KEY_B, prompt)) > 0
    # a salted namespace is reset by naming its salt
    _complete(server, KEY_B, prompt, cache_salt="x")
    r = httpx.post(
        f"{server.url}/v1/cache/reset", json={"cache_salt": "x"}, headers=_auth(KEY_B), timeout=30
    )
    assert r.status_code == 200 and r.json()["freed_blocks"] > 0
    assert _cached(_complete(server, KEY_B, prompt, cache_salt="x")) == 0
    assert _cached(_complete(server, KEY_B, prompt)) > 0
    r = httpx.post(
        f"{server.url}/v1/cache/reset", content=b"{nope", headers=_auth(KEY_B), timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_cache_stats_json(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/v1/cache/stats", headers=_auth(KEY_ADMIN), timeout=30)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["num_blocks_total"] == 512 and s["block_size"] == 16
    assert (
        s["num_blocks_total"]
        == s["num_blocks_free"] + s["num_blocks_cached"] + s["num_blocks_used"]
    )
    assert s["prefix_cache_hit_tokens"] > 0
    assert s["prefix_cache_hit_rate"] == pytest.approx(
        s["prefix_cache_hit_tokens"] / s["prefix_cache_queried_tokens"]
    )
    for name in ("num_evictions", "num_expirations", "num_preemptions", "kv_usage"):
        assert name in s


def test_metrics_move_as_requests_are_served(server: ServerProcess) -> None:
    before = _metrics(server)
    gauges = [
        "llm_serve:prefix_cache_hit_rate",
        "llm_serve:kv_cache_usage_perc",
        'llm_serve:kv_cache_blocks{state="free"}',
        'llm_serve:kv_cache_blocks{state="cached"}',
        'llm_serve:kv_cache_blocks{state="used"}',
        "llm_serve:num_requests_running",
        "llm_serve:num_requests_waiting",
        "llm_serve:cache_evictions_total",
        "llm_serve:cache_expirations_total",
        "llm_serve:num_preemptions_total",
    ]
    for name in gauges:
        assert name in before, name
    prompt = PROMPT + " metrics"
    first = _complete(server, KEY_A, prompt, max_tokens=5, ignore_eos=True)
    hit = _complete(server, KEY_A, prompt, max_tokens=5, ignore_eos=True)
    after = _metrics(server)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("llm_serve:prefix_cache_queries_total") == 2 * len(prompt)
    assert _cached(hit) > _cached(first)  # PROMPT's blocks are cached from earlier tests
    assert delta("llm_serve:prefix_cache_hits_total") == _cached(first) + _cached(hit)
    assert delta("llm_serve:prompt_tokens_total") == 2 * len(prompt)
    assert delta("llm_serve:generation_tokens_total") == 10
    for hist in (
        "time_to_first_token_seconds",
        "time_per_output_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert delta(f"llm_serve:{hist}_count") == 2, hist
        assert delta(f"llm_serve:{hist}_sum") >= 0
        assert f'llm_serve:{hist}_bucket{{le="+Inf"}}' in after
    assert (
        after["llm_serve:e2e_request_latency_seconds_sum"]
        >= (after["llm_serve:time_to_first_token_seconds_sum"])
    )
    assert 0 < after["llm_serve:prefix_cache_hit_rate"] <= 1
    assert after["llm_serve:num_requests_running"] == 0


def test_huge_bodies_get_413(server: ServerProcess) -> None:
    big = {"model": "tiny", "prompt": "x" * (MAX_BYTES + 10), "max_tokens": 1}
    r = httpx.post(f"{server.url}/v1/completions", json=big, headers=_auth(KEY_A), timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BYTES // 1024 + 2):
            yield b"y" * 1024
        yield b'"}'

    r = httpx.post(
        f"{server.url}/v1/completions", content=chunks(), headers=_auth(KEY_A), timeout=30
    )
    assert r.status_code == 413, r.text
    assert server.healthy()
    assert _complete(server, KEY_A, "still fine")["choices"]


def test_keys_never_reach_the_log(server: ServerProcess) -> None:
    log = server.log()
    assert KEY_A not in log and KEY_B not in log


def test_bench_reports_and_saves(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_serve.cli",
            "bench",
            "--url",
            f"{server.url}/v1",
            "--api-key",
            KEY_B,
            "--num-prefixes",
            "2",
            "--prefix-len",
            "40",
            "--suffix-len",
            "4",
            "--output-len",
            "6",
            "--num-requests",
            "8",
            "--max-concurrency",
            "2",
            "--request-rate",
            "50",
            "--ignore-eos",
            "--save",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = proc.stdout
    for label in ("Successful requests:", "Request throughput", "Output token throughput"):
        assert label in report, report
    assert re.search(r"Successful requests:\s+8", report), report
    for metric in ("TTFT", "TPOT", "ITL", "E2E"):
        assert re.search(rf"^{metric}\s+[\d.]+\s+[\d.]+\s+[\d.]+$", report, re.M), report
    assert re.search(r"Cached prompt tokens \(server\):\s+\d+ \([\d.]+%\)", report), report
    assert "requests" in proc.stderr  # the progress bar
    data = json.loads((out / "bench.json").read_text())
    summary = data["summary"]
    assert summary["model"] == "tiny" and summary["completed"] == 8 and summary["failed"] == 0
    assert summary["output_tokens"] == 8 * 6
    assert summary["cached_token_share"] > 0  # shared prefixes within one tenant
    assert len(data["requests"]) == 8 and all(r["ok"] for r in data["requests"])
    assert "api_key" not in summary["config"] and KEY_B not in (out / "bench.json").read_text()
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # without a key the benchmark stops at once with a clear message
    proc = subprocess.run(
        [sys.executable, "-m", "llm_serve.cli", "bench", "--url", server.url, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2 and "--api-key" in proc.stderr


def test_tenants_do_not_see_each_others_activity(server: ServerProcess) -> None:
    """Finding: after one request of A, B saw engine-wide tokens and cached blocks move. Now
    /metrics is the admin's alone and B's cache stats count B's own requests only."""
    for key in (KEY_A, KEY_B):
        r = httpx.get(f"{server.url}/metrics", headers=_auth(key), timeout=30)
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "admin_key_required"

    def own(key: str) -> dict[str, Any]:
        r = httpx.get(f"{server.url}/v1/cache/stats", headers=_auth(key), timeout=30)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        assert data["scope"] == "tenant"
        assert "num_blocks_cached" not in data and "num_blocks_total" not in data
        return data

    b_before, a_before = own(KEY_B), own(KEY_A)
    prompt = PROMPT + " private"
    first = _complete(server, KEY_A, prompt, max_tokens=3, ignore_eos=True)
    second = _complete(server, KEY_A, prompt, max_tokens=3, ignore_eos=True)
    assert own(KEY_B) == b_before
    a_after = own(KEY_A)
    assert a_after["num_requests"] == a_before["num_requests"] + 2
    assert a_after["prompt_tokens_total"] - a_before["prompt_tokens_total"] == 2 * len(prompt)
    assert a_after["generation_tokens_total"] - a_before["generation_tokens_total"] == 6
    hits = a_after["prefix_cache_hit_tokens"] - a_before["prefix_cache_hit_tokens"]
    assert hits == _cached(first) + _cached(second) > 0
    # the admin key is also an ordinary key with its own namespace
    assert _cached(_complete(server, KEY_ADMIN, prompt)) == 0
