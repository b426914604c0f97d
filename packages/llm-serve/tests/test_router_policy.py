"""The routing policy on its own (no Ray): affinity, thresholds, load bounds, faults."""

from __future__ import annotations

import sys

import pytest

from llm_serve.ray_serve.router import PrefixRouter, RoutingPolicy
from prefix_index import BlockRemoved, BlockStored, Cleared, block_hashes

BS = 4
SYSTEM = list(range(100, 132))  # 8 blocks


def _router(**kw: float) -> PrefixRouter:
    router = PrefixRouter(BS, RoutingPolicy(**kw))  # type: ignore[arg-type]
    for name in ("r0", "r1"):
        router.add_replica(name)
    return router


def _stored(router: PrefixRouter, replica: str, tokens: list[int], ns: bytes = b"") -> None:
    router.apply(replica, [BlockStored(ns, tuple(block_hashes(tokens, BS, ns)), None)])


def _route(router: PrefixRouter, tokens: list[int], ns: bytes = b"") -> str:
    return str(router.choose(ns, block_hashes(tokens, BS, ns), len(tokens)))


def test_longest_match_wins_and_namespaces_do_not_mix() -> None:
    router = _router()
    _stored(router, "r1", SYSTEM)
    _stored(router, "r0", SYSTEM[:8])
    assert _route(router, SYSTEM + [1, 2, 3]) == "r1"
    assert router.routed[("r1", "prefix")] == 1
    # Another tenant's identical tokens hash differently: no affinity, least loaded (r0).
    assert _route(router, SYSTEM + [1, 2, 3], ns=b"tenant-b") == "r0"
    assert router.routed[("r0", "load")] == 1


def test_threshold_and_load_bound_send_to_the_least_loaded() -> None:
    router = _router(prefix_match_threshold=0.5, balance_abs_threshold=1)
    _stored(router, "r1", SYSTEM[:8])  # 2 blocks
    # 8 of 40 tokens cached: below half the prompt, so load decides (both idle: the one with
    # fewer cached blocks, r0).
    assert _route(router, SYSTEM[:8] + [0] * 32) == "r0"
    _stored(router, "r1", SYSTEM)
    assert _route(router, SYSTEM + [5]) == "r1"  # in flight r1 0, r0 1: affinity
    assert _route(router, SYSTEM + [6]) == "r1"  # r1 1, r0 1
    assert _route(router, SYSTEM + [7]) == "r1"  # r1 2, r0 1: one more, within the bound
    assert _route(router, SYSTEM + [8]) == "r0"  # r1 3, r0 1: past it
    load = router.loads["r0"]
    load.in_flight, load.kv_usage = 0, 0.0
    router.loads["r1"].kv_usage = 0.9  # a nearly full replica loses affinity too
    router.loads["r1"].in_flight = 0
    assert _route(router, SYSTEM + [8]) == "r0"


def test_in_flight_hint_holds_until_events_settle() -> None:
    router = _router()
    prompt = SYSTEM + [9]
    hashes = block_hashes(prompt, BS)
    first = _route(router, prompt)
    # Before any event: the second request of the prefix follows the first.
    assert _route(router, SYSTEM + [10]) == first
    router.finished(first, b"", hashes)
    router.finished(first, b"", block_hashes(SYSTEM + [10], BS))
    assert router.loads[first].in_flight == 0
    assert _route(router, SYSTEM + [11]) == first  # still hinted: not settled yet
    router.finished(first, b"", block_hashes(SYSTEM + [11], BS))
    router.settled(first, router.pending(first))
    # Settled with no BlockStored event: the replica does not hold it; nothing is claimed.
    assert router.tracker.match(first, b"", hashes) == 0
    assert router.routed[(first, "prefix")] == 2


def test_removed_cleared_and_dead_replicas_lose_their_blocks() -> None:
    router = _router()
    _stored(router, "r1", SYSTEM)
    hashes = block_hashes(SYSTEM, BS)
    router.apply("r1", [BlockRemoved(b"", tuple(hashes[4:]))])
    assert router.tracker.match("r1", b"", hashes) == 4
    router.apply("r1", [Cleared(b"")])
    assert router.tracker.match("r1", b"", hashes) == 0
    _stored(router, "r1", SYSTEM)
    router.remove_replica("r1")
    assert router.tracker.num_blocks("r1") == 0 and "r1" not in router.loads
    router.apply("r1", [BlockStored(b"", tuple(hashes), None)])  # late events are ignored
    assert router.tracker.num_blocks("r1") == 0
    assert _route(router, SYSTEM) == "r0"
    router.remove_replica("r0")
    with pytest.raises(LookupError, match="no engine replica"):
        _route(router, SYSTEM)


@pytest.mark.parametrize(
    "kw",
    [
        {"prefix_match_threshold": 1.5},
        {"balance_abs_threshold": -1},
        {"balance_kv_threshold": 2.0},
    ],
)
def test_policy_rejects_bad_values(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        RoutingPolicy(**kw)  # type: ignore[arg-type]


def test_replicas_without_ray_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_model: str
) -> None:
    from llm_serve.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", tiny_model, "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert "llm-serve[ray]" in err and "--replicas 2" in err
    assert main(["serve", tiny_model, "--ray-address", "127.0.0.1:6379"]) == 2
    assert "--replicas >= 2" in capsys.readouterr().err


def test_readme_router_example_runs() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Several replicas on Ray Serve", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme_example"})


def test_baseline_strategies() -> None:
    rr = _router(strategy="round_robin")  # type: ignore[arg-type]
    _stored(rr, "r1", SYSTEM)
    assert [_route(rr, SYSTEM + [i]) for i in range(4)] == ["r1", "r0", "r1", "r0"]
    ll = _router(strategy="least_loaded")  # type: ignore[arg-type]
    _stored(ll, "r1", SYSTEM)
    assert [_route(ll, SYSTEM + [i]) for i in range(3)] == ["r0", "r1", "r0"]
    with pytest.raises(ValueError, match="strategy"):
        RoutingPolicy(strategy="random")
