"""Queue limits and shutdown of a real server process (one process; SIGTERM test last)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

ServerProcess = Any  # conftest.ServerProcess


@pytest.fixture(scope="module")
def server(tiny_model: str, start_server: Any) -> Iterator[ServerProcess]:
    proc = start_server(
        [
            tiny_model,
            "--device",
            "cpu",
            "--num-blocks",
            "1024",
            "--max-batch-size",
            "2",
            "--max-queue",
            "1",
            "--shutdown-timeout",
            "0.5",
        ]
    )
    yield proc
    proc.stop()


def _completion(url: str, max_tokens: int, **kw: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": "load", "max_tokens": max_tokens, "ignore_eos": True, **kw}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_429_when_the_waiting_queue_is_full(server: ServerProcess) -> None:
    # n larger than the whole queue can never be accepted: 400 (no retry can help), not 429
    r = _completion(server.url, 4, n=2)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "too_many_choices" and "--max-queue" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}

    # 2 run, 1 waits, the rest are turned away, told when to retry
    results: list[int] = []
    lock = threading.Lock()

    def send() -> None:
        r = _completion(server.url, 300)
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(set(results)) == [200, 429], results
    assert server.healthy()
    assert _completion(server.url, 4).status_code == 200


def test_sigterm_finishes_in_flight_aborts_late_and_exits_cleanly(server: ServerProcess) -> None:
    outcome: dict[str, str] = {}

    def stream(name: str, max_tokens: int, started: threading.Event) -> None:
        body = {
            "model": "tiny",
            "prompt": name,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        text = []
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    started.set()
                    if line:
                        text.append(line)
        except httpx.HTTPError as exc:
            text.append(f"transport error: {exc}")
        outcome[name] = "\n".join(text)

    short_started, long_started = threading.Event(), threading.Event()
    # the short one needs ~0.1 s, the long one (4000 tokens, most of the 4096 positions) several s
    short = threading.Thread(target=stream, args=("short", 40, short_started))
    long = threading.Thread(target=stream, args=("long", 4000, long_started))
    long.start()
    assert long_started.wait(30)
    short.start()
    assert short_started.wait(30)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(30)
    elapsed = time.monotonic() - t0
    short.join(30)
    long.join(30)
    assert rc == 0, server.log()
    assert elapsed < 15
    assert outcome["short"].endswith("data: [DONE]"), outcome["short"][-500:]
    assert '"finish_reason":"length"' in outcome["short"]
    # the long one was cut off at --shutdown-timeout with an error event
    assert "shutting down" in outcome["long"], outcome["long"][-500:]
    assert '"finish_reason":"length"' not in outcome["long"]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/health", timeout=2)


def test_a_model_that_fails_to_load_exits_with_status_1(tmp_path: Any) -> None:
    import subprocess
    import sys

    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [sys.executable, "-m", "llm_serve.cli", "serve", str(missing), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "nothing is downloaded" in proc.stderr
