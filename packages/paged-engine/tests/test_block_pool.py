"""BlockPool accounting and the scheduler's packing rules, without a model."""

from __future__ import annotations

import pytest

from paged_engine.block_pool import BlockPool, NoFreeBlocksError
from paged_engine.detokenizer import IncrementalDetokenizer
from paged_engine.sampling_params import SamplingParams
from paged_engine.scheduler import Scheduler
from paged_engine.sequence import Sequence


def test_allocate_release_and_invariants() -> None:
    pool = BlockPool(8, 4)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert pool.num_free == 0 and pool.num_used == 8
    pool.check_invariants([a, b])
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.release(a)
    assert pool.num_free == 3
    pool.check_invariants([b])
    with pytest.raises(AssertionError):
        pool.check_invariants([a, b])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(a)
    assert pool.blocks_for(0) == 0 and pool.blocks_for(4) == 1 and pool.blocks_for(5) == 2


def _seq(rid: str, n: int) -> Sequence:
    prompt = list(range(n))
    return Sequence(rid, prompt, SamplingParams(), IncrementalDetokenizer(None, prompt))


def _advance(sched: Scheduler) -> list[tuple[str, int]]:
    out = sched.schedule()
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_tokens
        if s.seq.num_computed_tokens == len(s.seq):
            s.seq.append_token(0)
    return [(s.seq.request_id, s.num_tokens) for s in out.scheduled]


def test_chunked_prefill_and_decode_share_the_budget() -> None:
    pool = BlockPool(64, 4)
    sched = Scheduler(pool, max_batch_size=8, max_num_batched_tokens=6)
    sched.add(_seq("a", 10))
    sched.add(_seq("b", 3))
    assert _advance(sched) == [("a", 6)]
    assert _advance(sched) == [("a", 4), ("b", 2)]
    assert _advance(sched) == [("a", 1), ("b", 1)]
    assert _advance(sched) == [("a", 1), ("b", 1)]
    pool.check_invariants(s.block_ids for s in sched.running)


def test_max_batch_size_limits_running() -> None:
    sched = Scheduler(BlockPool(64, 4), max_batch_size=2, max_num_batched_tokens=100)
    for r in "abc":
        sched.add(_seq(r, 2))
    assert [r for r, _ in _advance(sched)] == ["a", "b"]
    assert len(sched.waiting) == 1


def test_newest_is_preempted_when_blocks_run_out() -> None:
    pool = BlockPool(4, 2)
    sched = Scheduler(pool, max_batch_size=8, max_num_batched_tokens=100)
    sched.add(_seq("old", 3))
    sched.add(_seq("new", 3))
    assert _advance(sched) == [("old", 3), ("new", 3)]  # 2 + 2 blocks, all taken
    assert _advance(sched) == [("old", 1), ("new", 1)]  # position 3 still fits block 2
    # old now needs a third block for position 4: new is preempted and recomputed later.
    assert _advance(sched) == [("old", 1)]
    assert sched.num_preemptions == 1
    assert [s.request_id for s in sched.waiting] == ["new"]
    new = sched.waiting[0]
    assert new.block_ids == [] and new.num_computed_tokens == 0
    pool.check_invariants(s.block_ids for s in sched.running)
