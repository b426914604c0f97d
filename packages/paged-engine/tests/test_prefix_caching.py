"""Automatic prefix caching in the engine: reuse, tenancy, accounting, policies, TTL, scheduling."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paged_engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from paged_engine.testing import assert_greedy_match, drain, hf_greedy

BS = 4
GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_model: Callable[[str], tuple[Path, Any]]) -> tuple[Path, Any]:
    return tiny_model("llama")


def _engine(path: Path, **kw: Any) -> LLMEngine:
    kw.setdefault("num_blocks", 64)
    kw.setdefault("block_size", BS)
    # Compared with transformers in float32: the exact path.
    kw.setdefault("dtype", "float32")
    kw.setdefault("weight_quant", None)
    return LLMEngine(EngineConfig(model=str(path), device="cpu", **kw))


def _run(engine: LLMEngine, prompts: list[list[int]], salt: bytes = b"") -> list[RequestOutput]:
    return engine.generate(prompts, GREEDY, use_tqdm=False, cache_salt=salt)


PROMPTS = [
    list(range(3, 30)),  # 27 tokens: 6 reusable blocks
    list(range(3, 23)) + [90, 91, 92],  # shares 5 blocks with the first
    [7] * 16,  # exactly 4 blocks: a full-prompt hit reuses 3, recomputes the last token
]


def test_second_run_hits_and_matches_the_first_and_hf(llama: tuple[Path, Any]) -> None:
    path, hf = llama
    engine = _engine(path)
    cold = _run(engine, PROMPTS)
    assert next(o.num_cached_tokens for o in cold) == 0
    warm = _run(engine, PROMPTS)
    assert [o.num_cached_tokens for o in warm] == [24, 20, 12]
    for c, w, p in zip(cold, warm, PROMPTS, strict=True):
        ref, logits = hf_greedy(hf, p, GREEDY.max_tokens)
        assert_greedy_match(w.token_ids, ref, logits)
        assert_greedy_match(c.token_ids, ref, logits)
    st = engine.stats()
    assert st.prefix_cache_queried_tokens == 2 * sum(len(p) for p in PROMPTS)
    assert st.prefix_cache_hit_tokens == sum(o.num_cached_tokens for o in cold + warm)
    assert 0 < st.prefix_cache_hit_rate < 1
    assert st.num_blocks_used == 0 and st.num_blocks_cached > 0


def test_cache_salt_isolates_tenants(llama: tuple[Path, Any]) -> None:
    engine = _engine(llama[0])
    _run(engine, PROMPTS[:1], salt=b"alice")
    assert _run(engine, PROMPTS[:1], salt=b"bob")[0].num_cached_tokens == 0
    assert _run(engine, PROMPTS[:1])[0].num_cached_tokens == 0
    assert _run(engine, PROMPTS[:1], salt=b"alice")[0].num_cached_tokens == 24
    # Resetting one tenant's cache leaves the others'.
    assert engine.reset_prefix_cache(b"alice") > 0
    assert _run(engine, PROMPTS[:1], salt=b"alice")[0].num_cached_tokens == 0
    assert _run(engine, PROMPTS[:1], salt=b"bob")[0].num_cached_tokens == 24
    with pytest.raises(ValueError, match="bytes"):
        engine.add_request("x", [1, 2], GREEDY, cache_salt="alice")  # type: ignore[arg-type]


def test_disabled_caching_never_hits(llama: tuple[Path, Any]) -> None:
    engine = _engine(llama[0], enable_prefix_caching=False)
    _run(engine, PROMPTS)
    assert all(o.num_cached_tokens == 0 for o in _run(engine, PROMPTS))
    st = engine.stats()
    assert st.num_blocks_cached == 0 and st.num_blocks_free == st.num_blocks_total


def test_shared_prefix_arriving_together_is_computed_once(llama: tuple[Path, Any]) -> None:
    engine = _engine(llama[0], max_num_batched_tokens=64)
    system = list(range(10, 34))  # 6 blocks
    prompts = [system + [40 + i, 50 + i, 60 + i] for i in range(4)]
    computed = 0
    run = engine.runner.execute

    def counting(scheduled: Any) -> Any:
        nonlocal computed
        computed += sum(s.num_tokens for s in scheduled)
        return run(scheduled)

    engine.runner.execute = counting  # type: ignore[method-assign]
    outs = _run(engine, prompts)
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == len(system) for o in outs[1:])
    prefill = computed - 5 * len(prompts)  # each request decodes 5 tokens after its first
    assert prefill == len(system) + 3 * len(prompts)


def test_hits_are_admitted_first_without_starving_others(llama: tuple[Path, Any]) -> None:
    engine = _engine(llama[0], max_batch_size=1, prefix_match_threshold=0.5)
    hot = list(range(10, 30))
    _run(engine, [hot])
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request("miss", list(range(60, 80)), params)
    for i in range(12):
        engine.add_request(f"hit{i}", [*hot, 100 + i], params)
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    # Hits overtake the miss, but only MAX_SKIPS times.
    assert order.index("miss") == engine.scheduler.MAX_SKIPS
    assert order[: engine.scheduler.MAX_SKIPS] == [
        f"hit{i}" for i in range(engine.scheduler.MAX_SKIPS)
    ]


def test_threshold_zero_is_first_come_first_served(llama: tuple[Path, Any]) -> None:
    engine = _engine(llama[0], max_batch_size=1, prefix_match_threshold=0.0)
    hot = list(range(10, 30))
    _run(engine, [hot])
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request("miss", list(range(60, 80)), params)
    engine.add_request("hit", [*hot, 1], params)
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["miss", "hit"]


def _scan(engine: LLMEngine, system: list[int]) -> None:
    for i in range(6):  # the system prompt is hot
        _run(engine, [[*system, 100 + i, 101, 102, 103]])
    for i in range(20):  # then one-off prompts, several times the pool's size
        _run(engine, [[(7 * i + j) % 120 + 1 for j in range(12)]])


@pytest.mark.parametrize(("policy", "kept"), [("hybrid", True), ("lfu", True), ("lru", False)])
def test_eviction_policy_decides_whether_a_hot_prompt_survives_a_scan(
    llama: tuple[Path, Any], policy: str, kept: bool
) -> None:
    engine = _engine(llama[0], num_blocks=24, eviction_policy=policy)
    system = list(range(10, 26))  # 4 blocks
    _scan(engine, system)
    assert engine.stats().num_evictions > 0
    hit = _run(engine, [[*system, 1, 2, 3, 4]])[0].num_cached_tokens
    assert (hit == len(system)) is kept


def test_ttl_expires_idle_blocks_every_step(llama: tuple[Path, Any]) -> None:
    engine = _engine(llama[0], cache_ttl=0.2)
    _run(engine, PROMPTS)
    assert engine.stats().num_blocks_cached > 0
    time.sleep(0.3)
    engine.step()  # an idle step still expires
    st = engine.stats()
    assert st.num_blocks_cached == 0 and st.num_expirations > 0
    assert st.num_blocks_free == st.num_blocks_total


def test_preempted_sequences_come_back_from_cache(llama: tuple[Path, Any]) -> None:
    # Two sequences fill the pool; when the older one grows, the newer is preempted. Its full
    # blocks stay cached (only what the older one needs is evicted), so it resumes from cache.
    prompts = [list(range(5, 21)), list(range(30, 46))]
    params = [
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
    ]
    computed: dict[bool, int] = {}
    results: dict[bool, list[list[int]]] = {}
    for caching in (False, True):
        engine = _engine(llama[0], num_blocks=10, enable_prefix_caching=caching)
        total = 0
        run = engine.runner.execute

        def counting(scheduled: Any, run: Any = run) -> Any:
            nonlocal total
            total += sum(s.num_tokens for s in scheduled)
            return run(scheduled)

        engine.runner.execute = counting  # type: ignore[method-assign]
        outs = engine.generate(prompts, params, use_tqdm=False)
        assert engine.stats().num_preemptions > 0
        computed[caching], results[caching] = total, [o.token_ids for o in outs]
        # Hits are counted once, at first admission (cold cache, distinct prompts: none).
        assert all(o.num_cached_tokens == 0 for o in outs)
    assert computed[True] < computed[False]
    assert results[True] == results[False]


def test_random_workload_keeps_block_accounting(llama: tuple[Path, Any]) -> None:
    rng = random.Random(0)
    engine = _engine(llama[0], num_blocks=16, max_num_batched_tokens=24, cache_ttl=60.0)
    shared = [list(range(10, 10 + 4 * k)) for k in (2, 3, 4)]
    live: set[str] = set()
    for step in range(300):
        r = rng.random()
        if r < 0.3:
            base = rng.choice(shared) if rng.random() < 0.7 else []
            prompt = base + [rng.randrange(1, 120) for _ in range(rng.randrange(1, 10))]
            rid = f"r{step}"
            params = SamplingParams(max_tokens=rng.randrange(1, 24), temperature=0, ignore_eos=True)
            engine.add_request(rid, prompt, params, cache_salt=rng.choice([b"", b"t"]))
            live.add(rid)
        elif r < 0.4 and live:
            engine.abort(rng.choice(sorted(live)))
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        engine.check_invariants()
        st = engine.stats()
        assert st.num_blocks_free + st.num_blocks_cached + st.num_blocks_used == st.num_blocks_total
    drain(engine)
    st = engine.stats()
    assert st.num_blocks_used == 0 and st.num_preemptions > 0 and st.num_evictions > 0
    assert st.prefix_cache_hit_tokens > 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("eviction_policy", "fifo", "eviction_policy"),
        ("cache_ttl", 0, "cache_ttl"),
        ("cache_ttl", float("inf"), "cache_ttl"),
        ("prefix_match_threshold", 1.5, "prefix_match_threshold"),
        ("enable_prefix_caching", "yes", "enable_prefix_caching"),
    ],
)
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})  # type: ignore[arg-type]


def test_cache_events_come_once_per_step_and_mirror_the_index(llama: tuple[Path, Any]) -> None:
    from prefix_index import IndexEvent, PrefixTracker, block_hashes

    engine = _engine(llama[0], num_blocks=16)  # small: later prompts evict earlier blocks
    tracker = PrefixTracker()
    calls: list[int] = []

    def on_events(events: list[IndexEvent]) -> None:
        calls.append(steps)
        tracker.apply("me", events)

    steps = 0
    engine.subscribe_cache_events(on_events)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 12) for _ in range(rng.randrange(5, 30))] for _ in range(6)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY, cache_salt=b"t" if i % 2 else b"")
    while engine.has_unfinished():
        steps += 1
        assert all(o.finish_reason != "error" for o in engine.step())
        pool = engine.block_pool
        for i, p in enumerate(prompts):
            ns = b"t" if i % 2 else b""
            hashes = block_hashes(p, BS, ns)
            assert tracker.match("me", ns, hashes) == pool.peek(hashes, ns) // BS
        assert tracker.num_blocks("me") == len(pool.cached_chain())
    assert len(calls) == len(set(calls)) and calls  # at most one batch per step
    assert tracker.num_blocks("me") > 0
    engine.reset_prefix_cache()
    assert tracker.num_blocks("me") == 0  # the reset's events arrive without a step
    no_cache = _engine(llama[0], enable_prefix_caching=False)
    with pytest.raises(ValueError, match="prefix caching is off"):
        no_cache.subscribe_cache_events(on_events)
