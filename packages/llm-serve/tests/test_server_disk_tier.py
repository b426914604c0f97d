"""The disk tier through the server: persist, restart with a warm store, metrics, reset."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from llm_serve import ServerSettings, build_app
from paged_engine import EngineConfig

# byte tokenizer: one token per byte; 80 tokens = 5 full blocks of 16
PROMPT = "The quick brown fox jumps over the lazy dog again and again, all day long, ok?"


def _serve(in_process_server: Any, model: str, disk: Path | None) -> Any:
    config = EngineConfig(
        model=model,
        device="cpu",
        num_blocks=64,
        max_model_len=256,
        kv_disk_dir=None if disk is None else str(disk),
    )
    server = in_process_server(build_app(config, ServerSettings(model_name="tiny")))
    for _ in range(600):
        if httpx.get(f"{server.url}/health").status_code == 200:
            return server
        time.sleep(0.05)
    raise AssertionError("the server did not become healthy")


def _complete(server: Any, salt: str = "", prompt: str = PROMPT) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0}
    if salt:
        body["cache_salt"] = salt
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _cached(data: dict[str, Any]) -> int:
    return int(data["usage"]["prompt_tokens_details"]["cached_tokens"])


def _metric(server: Any, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    for line in text.splitlines():
        if line.startswith(f"llm_serve:{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def test_persist_restart_hit_and_reset(
    in_process_server: Any, tiny_model: str, tmp_path: Path
) -> None:
    first = _serve(in_process_server, tiny_model, tmp_path)
    try:
        cold = _complete(first)
        assert _cached(cold) == 0
        r = httpx.post(f"{first.url}/v1/cache/persist", timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["written_blocks"] >= 4 and r.json()["scope"] == "all"
        assert _metric(first, "kv_disk_blocks") >= 4
        later = _complete(first, prompt=PROMPT.upper())  # cached in memory only, until shutdown
    finally:
        first.stop()  # a graceful shutdown writes the in-memory cache to the disk tier

    second = _serve(in_process_server, tiny_model, tmp_path)
    try:
        warm = _complete(second)
        assert _cached(warm) == 64  # 4 of the prompt's 5 blocks (its last token is computed)
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
        assert _metric(second, "disk_hit_tokens_total") == 64
        assert _metric(second, "prefix_cache_hits_total") == 64
        again = _complete(second, prompt=PROMPT.upper())
        assert _cached(again) == 64 and again["choices"][0]["text"] == later["choices"][0]["text"]
        assert (
            _complete(second, salt="other")["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        )
        stats = httpx.get(f"{second.url}/v1/cache/stats").json()
        assert stats["disk_blocks"] >= 4 and stats["disk_bytes"] > 0
        r = httpx.post(f"{second.url}/v1/cache/reset", timeout=60)
        assert r.status_code == 200
        assert httpx.get(f"{second.url}/v1/cache/stats").json()["disk_blocks"] == 0
    finally:
        second.stop()
    assert not list(tmp_path.rglob("*.kvb"))  # nothing cached since the reset was persisted


def test_persist_without_a_disk_tier_is_a_400(in_process_server: Any, tiny_model: str) -> None:
    server = _serve(in_process_server, tiny_model, None)
    try:
        r = httpx.post(f"{server.url}/v1/cache/persist", timeout=30)
        assert r.status_code == 400 and "--kv-disk-dir" in r.json()["error"]["message"]
    finally:
        server.stop()
