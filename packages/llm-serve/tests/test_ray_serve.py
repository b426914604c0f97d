"""Two engine replicas on a local Ray cluster behind one routed endpoint (tiny random model).

Ray's startup (cluster, Serve controller, two replicas loading the model) is paid once for the
module; tests share the deployment and run in file order (the replica kill comes last).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llm_serve.ray_serve import require_ray  # first: sets Ray's environment defaults

require_ray()

from llm_serve.ray_serve.app import build_routed_app  # noqa: E402
from llm_serve.ray_serve.launch import deploy_replicas, start_ray  # noqa: E402
from llm_serve.ray_serve.routed_engine import RoutedEngine  # noqa: E402
from llm_serve.state import ServerSettings  # noqa: E402
from paged_engine import EngineConfig  # noqa: E402

# Starting Ray and two replicas takes ~100 s on a quiet 2-core machine, far more on a busy one.
pytestmark = pytest.mark.timeout(600)

KEYS = ("tenant-a-key", "tenant-b-key")
BS = 4


class Cluster:
    def __init__(self, server: Any, engine: RoutedEngine) -> None:
        self.server = server
        self.engine = engine
        self.url = server.url

    def post(self, path: str, body: dict[str, Any], key: str = KEYS[0]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120)

    def complete(self, prompt: str, key: str = KEYS[0], **kw: Any) -> dict[str, Any]:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, **kw}
        r = self.post("/v1/completions", body, key)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def finished_per_replica(self) -> dict[str, int]:
        r = httpx.get(
            self.url + "/v1/cache/stats", headers={"Authorization": f"Bearer {KEYS[0]}"}
        )
        assert r.status_code == 200, r.text
        return {rep["replica"]: rep["num_finished"] for rep in r.json()["replicas"]}


@pytest.fixture(scope="module")
def cluster(tiny_model: str, in_process_server: Any) -> Iterator[Cluster]:
    import ray

    started = start_ray()
    try:
        config = EngineConfig(model=tiny_model, device="cpu", num_blocks=96, block_size=BS)
        handles = deploy_replicas(config, 2)
        engine = RoutedEngine(handles)
        settings = ServerSettings(
            model_name="tiny", api_keys=KEYS, admin_api_key=KEYS[0], log_interval=0, max_queue=4
        )
        server = in_process_server(build_routed_app(engine, settings))
        deadline = time.monotonic() + 60
        while not (
            engine.ready and all(r.uid is not None for r in engine.replicas.values())
        ):
            assert time.monotonic() < deadline, "replicas not reachable within 60 s"
            time.sleep(0.1)
        yield Cluster(server, engine)
        server.stop()
    finally:
        if started:
            ray.shutdown()


def _family(i: int) -> str:
    # Distinct 40-character (byte tokenizer: 40-token) prefixes, far from each other.
    return "".join(chr(ord("a") + (i * 7 + k * (i + 3)) % 26) for k in range(40))


def test_prefix_families_stick_to_one_replica(cluster: Cluster) -> None:
    owner: dict[int, str] = {}
    for turn in range(3):
        for fam in range(4):
            before = cluster.finished_per_replica()
            out = cluster.complete(_family(fam) + f" turn {turn}?")
            after = cluster.finished_per_replica()
            served = [r for r in after if after[r] != before.get(r, 0)]
            assert len(served) == 1, (before, after)
            cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
            if turn == 0:
                owner[fam] = served[0]
            else:
                assert served[0] == owner[fam], f"family {fam} moved at turn {turn}"
                assert cached >= 40, f"family {fam} turn {turn}: {cached} cached tokens"
    assert set(owner.values()) == set(cluster.engine.replicas), "both replicas take families"
    routed = cluster.engine.router.routed if cluster.engine.router else {}
    assert sum(n for (_, why), n in routed.items() if why == "prefix") >= 8


def test_streaming_n_and_metrics_work_as_with_one_engine(cluster: Cluster) -> None:
    body = {"model": "tiny", "prompt": "stream me", "max_tokens": 3, "n": 2, "stream": True,
            "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, headers=headers,
                      timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = {0: "", 1: ""}
    for c in chunks:
        for ch in c["choices"]:
            text[ch["index"]] += ch["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert text[0] == text[1] and text[0]  # greedy: both samples agree
    # More choices than max_queue=4 can ever hold: 400, as with one engine.
    r = cluster.post("/v1/completions", {"model": "tiny", "prompt": "x", "n": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_choices"
    r = cluster.post("/v1/completions", {"model": "tiny", "prompt": "x"}, key="wrong-key")
    assert r.status_code == 401
    metrics = httpx.get(cluster.url + "/metrics", headers=headers).text
    assert 'llm_serve:replica_up{replica="engine-0"} 1.0' in metrics
    assert 'llm_serve:replica_up{replica="engine-1"} 1.0' in metrics
    assert "llm_serve:prefix_cache_hits_total " in metrics  # the cluster-wide sum
    assert "llm_serve:time_to_first_token_seconds_count" in metrics


def test_tenants_stay_isolated_across_replicas(cluster: Cluster) -> None:
    prompt = "a shared-looking system prompt for everyone, 48 chars! question"
    first = cluster.complete(prompt, key=KEYS[0])
    again = cluster.complete(prompt, key=KEYS[0])
    other = cluster.complete(prompt, key=KEYS[1])
    cached = [o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in (first, again, other)]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0
    # A reset reaches every replica, and only the caller's namespace.
    r = cluster.post("/v1/cache/reset", {}, key=KEYS[1])
    assert r.status_code == 200 and r.json()["scope"] == "tenant"
    assert cluster.complete(prompt, key=KEYS[0])["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ] > 0
    r = cluster.post("/v1/cache/reset", {}, key=KEYS[0])
    assert r.json()["freed_blocks"] > 0
    assert cluster.complete(prompt, key=KEYS[0])["usage"]["prompt_tokens_details"][
        "cached_tokens"
    ] == 0


def test_a_killed_replica_fails_its_requests_cleanly_and_service_continues(
    cluster: Cluster,
) -> None:
    engine = cluster.engine
    # As long as fits the context (96 blocks of 4 tokens): a longer one is refused with 400.
    body = {"model": "tiny", "prompt": "a long answer, please", "max_tokens": 350,
            "ignore_eos": True, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    lines: list[str] = []
    status: list[int] = []

    def stream() -> None:
        with httpx.stream("POST", cluster.url + "/v1/completions", json=body, headers=headers,
                          timeout=120) as r:  # fmt: skip
            status.append(r.status_code)
            lines.extend(line for line in r.iter_lines() if line.startswith("data: "))

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 30
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "the long request never started"
        busy = [g.replica for g in list(engine._groups.values())]
        victim = busy[0] if busy and len(lines) >= 2 else None
        time.sleep(0.05)
    pid = engine.replicas[victim].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive() and status == [200]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "service_unavailable" and victim in error["message"]
    # The router forgot the dead replica; the others keep serving.
    assert victim not in (engine.router.loads if engine.router else {})
    assert engine.router is not None and engine.router.tracker.num_blocks(victim) == 0
    for i in range(3):
        assert cluster.complete(f"after the failure {i}")["choices"][0]["finish_reason"]
