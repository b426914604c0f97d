"""The PrefixIndex contract, operation by operation."""

from __future__ import annotations

import pytest

from prefix_index import PrefixIndex, block_hashes, default_hasher

B = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def toks(*blocks: int) -> list[int]:
    """Tokens made of whole blocks, each block filled with its number."""
    return [b for b in blocks for _ in range(B)]


def test_insert_then_match_and_peek() -> None:
    idx = PrefixIndex(B)
    assert idx.insert(toks(1, 2, 3) + [9, 9], [10, 11, 12]) == []
    assert len(idx) == 3 and 11 in idx and 99 not in idx
    m = idx.match(toks(1, 2, 7))
    assert m.handles == [10, 11] and m.num_tokens == 2 * B
    assert m.hashes == block_hashes(toks(1, 2), B)
    assert idx.peek(toks(1, 2, 3, 4)) == 3 * B
    assert idx.peek(toks(2, 1)) == 0
    assert idx.peek(toks(1, 2)[:-1]) == B  # a partial block never matches


def test_peek_and_lookup_have_no_side_effects() -> None:
    clock = FakeClock()
    idx = PrefixIndex(B, policy="lru", ttl=5.0, clock=clock)
    idx.insert(toks(1), [1])
    idx.insert(toks(2, 3), [2, 3])
    before = idx.stats()
    clock.now = 4.0
    assert idx.peek(toks(1)) == B
    m = idx.lookup(toks(2, 3, 4))
    assert m.handles == [2, 3] and m.num_tokens == 2 * B and m.hashes == block_hashes(toks(2, 3), B)
    assert idx.stats() == before
    assert idx.evict(1) == [1]  # neither refreshed block 1
    clock.now = 5.0
    assert idx.expire() == [3, 2]  # nor restarted the TTL


def test_insert_returns_handles_it_did_not_adopt() -> None:
    idx = PrefixIndex(B)
    idx.insert(toks(1, 2), [10, 11])
    # Block 1 cached under 10 already (same handle: neither adopted nor returned);
    # block 2 cached under 11 (so 21 is returned); block 3 is new (adopted).
    assert idx.insert(toks(1, 2, 3), [10, 21, 22]) == [21]
    assert idx.match(toks(1, 2, 3)).handles == [10, 11, 22]
    assert 21 not in idx


def test_misuse_raises_and_changes_nothing() -> None:
    idx = PrefixIndex(B)
    idx.insert(toks(1, 2), [10, 11])
    before = idx.stats()
    with pytest.raises(ValueError, match="one handle per full block"):
        idx.insert(toks(1, 2, 3), [10, 11])
    with pytest.raises(ValueError, match="already caches another block"):
        idx.insert(toks(5, 6), [30, 11])
    with pytest.raises(ValueError, match="repeated"):
        idx.insert(toks(5, 6), [30, 30])
    with pytest.raises(ValueError, match="at most one hash"):
        idx.match(toks(1), hashes=block_hashes(toks(1, 2), B))
    with pytest.raises(KeyError, match="caches no block"):
        idx.acquire([10, 99])
    with pytest.raises(ValueError, match="below zero"):
        idx.release([10])
    idx.acquire([10])
    with pytest.raises(ValueError, match="below zero"):
        idx.release([10, 10])
    assert idx.refcount(10) == 1
    idx.release([10])
    assert idx.stats() == before
    with pytest.raises(ValueError, match="block_size"):
        PrefixIndex(0)
    with pytest.raises(ValueError, match="ttl"):
        PrefixIndex(B, ttl=0)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        PrefixIndex(B, policy="fifo")
    with pytest.raises(TypeError, match="bytes"):
        idx.match(toks(1), namespace="a")  # type: ignore[arg-type]


class CountingHasher:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: bytes) -> bytes:
        self.calls += 1
        return default_hasher(data)


def test_precomputed_hashes_are_used_and_may_cover_a_prefix() -> None:
    hasher = CountingHasher()
    idx = PrefixIndex(B, hasher=hasher)
    tokens = toks(1, 2, 3)
    hashes = block_hashes(tokens, B)
    idx.insert(tokens, [1, 2, 3], hashes=hashes)
    assert hasher.calls == 0  # nothing hashed: all hashes given
    assert idx.match(tokens, hashes=hashes[:2]).handles == [1, 2, 3]
    assert hasher.calls == 1  # only the third block was hashed
    assert idx.peek(tokens, hashes=hashes) == 3 * B
    assert hasher.calls == 1


def test_match_hashes_only_as_far_as_it_matches() -> None:
    hasher = CountingHasher()
    idx = PrefixIndex(B, hasher=hasher)
    idx.insert(toks(1), [1])
    hasher.calls = 0
    m = idx.match(toks(1, 2, 3, 4, 5))
    assert m.handles == [1] and len(m.hashes) == 1
    assert hasher.calls == 2  # block 1 (a hit) and block 2 (the miss); seed memoized


def test_namespaces_never_share_blocks() -> None:
    idx = PrefixIndex(B)
    idx.insert(toks(1, 2), [1, 2], namespace=b"alice")
    assert idx.peek(toks(1, 2), namespace=b"bob") == 0
    assert idx.peek(toks(1, 2)) == 0
    assert idx.insert(toks(1, 2), [3, 4], namespace=b"bob") == []
    assert idx.match(toks(1, 2), namespace=b"bob").handles == [3, 4]
    assert sorted(idx.clear(b"alice")) == [1, 2]
    assert idx.peek(toks(1, 2), namespace=b"alice") == 0
    assert idx.peek(toks(1, 2), namespace=b"bob") == 2 * B


def test_colliding_hasher_never_returns_a_wrong_block() -> None:
    idx = PrefixIndex(B, hasher=lambda data: b"\x00" * 16)  # every block collides
    assert idx.insert(toks(1, 2), [1, 2]) == []
    assert idx.match(toks(3, 4)).handles == []
    assert idx.match(toks(1, 3)).handles == [1]
    assert idx.peek(toks(1, 2)) == 2 * B
    # A colliding block cannot be placed: the caller keeps its handle, and all after it.
    assert idx.insert(toks(1, 3, 4), [1, 5, 6]) == [5, 6]
    assert 5 not in idx and 6 not in idx
    assert idx.match(toks(1, 3, 4)).handles == [1]


def test_refcounted_blocks_are_never_evicted_and_parents_go_last() -> None:
    idx = PrefixIndex(B, policy="lru")
    idx.insert(toks(1, 2, 3), [1, 2, 3])
    idx.insert(toks(1, 2, 4), [1, 2, 4])
    idx.acquire([3])
    # Leaves first: 4, then nothing else (3 is held, so 1 and 2 keep a child).
    assert idx.evict(10) == [4]
    idx.release([3])
    # Now 3 is a leaf; once it goes, 2 and then 1 become leaves.
    assert idx.evict(10) == [3, 2, 1]
    assert len(idx) == 0 and idx.evict(1) == []


def test_evict_blocks_and_blocks_describe_what_a_second_tier_needs() -> None:
    idx = PrefixIndex(B, policy="lru")
    idx.insert(toks(1, 2), [1, 2], b"ns")
    idx.insert(toks(5), [5])
    h1, h2 = block_hashes(toks(1, 2), B, b"ns")
    listed = {b.handle: b for b in idx.blocks()}
    assert set(listed) == {1, 2, 5}
    assert [b.handle for b in idx.blocks(b"ns")] == [1, 2]  # parents first
    assert listed[2].parent_hash == h1 and listed[2].hash == h2 and listed[1].parent_hash is None
    out = idx.evict_blocks(2)
    assert [(b.handle, b.namespace, b.tokens) for b in out] == [(2, b"ns", toks(2)), (1, b"ns", toks(1))]
    assert out[0].hash == h2 and out[0].parent_hash == h1 and out[1].parent_hash is None
    assert len(idx) == 1 and idx.blocks(b"ns") == []


def test_evict_continues_into_parents_by_priority() -> None:
    idx = PrefixIndex(B, policy="lru")
    idx.insert(toks(1, 2), [1, 2])
    idx.insert(toks(7), [7])  # touched after chain 1-2
    assert idx.evict(2) == [2, 1]
    assert idx.evict(2) == [7]


def test_ttl_expires_only_unreferenced_leaves() -> None:
    clock = FakeClock()
    idx = PrefixIndex(B, ttl=10.0, clock=clock)
    idx.insert(toks(1, 2), [1, 2])
    clock.now = 5.0
    idx.insert(toks(3), [3])
    idx.acquire([2])
    clock.now = 12.0
    assert idx.expire() == []  # 1 has a held child; 3 idle only 7 s
    idx.release([2])  # release counts as use: 2's idle time restarts at 12
    assert idx.expire(now=21.0) == [3]
    clock.now = 22.0
    assert idx.expire() == [2, 1]
    assert len(idx) == 0
    s = idx.stats()
    assert s.expired_blocks == 3 and s.evicted_blocks == 0
    assert PrefixIndex(B).expire(now=1e9) == []


def test_match_restarts_ttl() -> None:
    clock = FakeClock()
    idx = PrefixIndex(B, ttl=10.0, clock=clock)
    idx.insert(toks(1), [1])
    clock.now = 9.0
    idx.match(toks(1))
    clock.now = 15.0
    assert idx.expire() == []
    clock.now = 19.0
    assert idx.expire() == [1]


def test_clear_keeps_referenced_chains() -> None:
    idx = PrefixIndex(B)
    idx.insert(toks(1, 2), [1, 2])
    idx.insert(toks(1, 3), [1, 3])
    idx.insert(toks(5), [5], namespace=b"t")
    idx.acquire([2])
    assert sorted(idx.clear()) == [3, 5]  # 1 stays: its child 2 is held
    assert 1 in idx and 2 in idx
    idx.release([2])
    assert sorted(idx.clear()) == [1, 2]
    assert idx.stats().cleared_blocks == 4 and len(idx) == 0


def test_stats_count_queries_and_hits() -> None:
    idx = PrefixIndex(B)
    idx.insert(toks(1, 2), [1, 2])
    idx.match(toks(1, 2) + [0])  # 9 tokens queried, 8 hit
    idx.match(toks(3))  # 4 queried, 0 hit
    idx.acquire([1])
    s = idx.stats()
    assert (s.queries, s.queried_tokens, s.hit_tokens) == (2, 9 + 4, 8)
    assert s.hit_rate == pytest.approx(8 / 13)
    assert (s.cached_blocks, s.referenced_blocks, s.unreferenced_blocks) == (2, 1, 1)
    assert s.inserted_blocks == 2
    assert PrefixIndex(B).stats().hit_rate == 0.0


def test_heap_compaction_keeps_results() -> None:
    idx = PrefixIndex(B, policy="lru")
    idx.insert(toks(1), [1])
    idx.insert(toks(2), [2])
    for _ in range(1000):  # many touches leave many stale heap entries
        idx.match(toks(1))
    assert len(idx._evict_heap) < 200
    assert idx.evict(2) == [2, 1]


def test_peek_hashes_counts_by_hash_alone() -> None:
    idx = PrefixIndex(B)
    idx.insert(toks(1, 2, 3), [1, 2, 3], namespace=b"t")
    hashes = block_hashes(toks(1, 2, 7), B, b"t")
    before = idx.stats()
    assert idx.peek_hashes(hashes, b"t") == 2 * B
    assert idx.peek_hashes(hashes) == 0  # another namespace
    assert idx.peek_hashes([]) == 0
    assert idx.stats() == before
    # Unlike peek, it trusts the hashes: a colliding hasher fools it (hence: heuristics only).
    bad = PrefixIndex(B, hasher=lambda data: b"\x00" * 16)
    bad.insert(toks(1), [1])
    assert bad.peek_hashes(block_hashes(toks(9), B, hasher=bad.hasher)) == B
    assert bad.peek(toks(9)) == 0


def test_events_are_batched_per_flush_and_stop_on_unsubscribe() -> None:
    from prefix_index import BlockRemoved, BlockStored, Cleared, IndexEvent

    index = PrefixIndex(2)
    batches: list[list[IndexEvent]] = []
    index.insert([1, 2, 3, 4], [0, 1])
    index.subscribe(batches.append)
    assert batches == []  # nothing is delivered before a flush
    index.insert([1, 2, 3, 4, 5, 6], [0, 1, 2])
    index.insert([9, 9], [3], namespace=b"t")
    index.evict(1)
    index.flush_events()
    h = block_hashes([1, 2, 3, 4, 5, 6], 2)
    ht = block_hashes([9, 9], 2, b"t")
    assert len(batches) == 1
    snapshot, rest = batches[0][:3], batches[0][3:]
    assert snapshot == [
        Cleared(None),
        BlockStored(b"", (h[0],), None),
        BlockStored(b"", (h[1],), h[0]),
    ]
    assert rest == [
        BlockStored(b"", (h[2],), h[1]),  # only the new block, under its cached parent
        BlockStored(b"t", (ht[0],), None),
        BlockRemoved(b"", (h[2],)),  # the lowest-priority leaf
    ]
    index.flush_events()
    assert len(batches) == 1  # nothing pending: no call
    index.clear(b"t")
    index.acquire([0])
    index.clear()  # block 0 is held: the others are removed one by one
    index.flush_events()
    assert batches[1] == [Cleared(b"t"), BlockRemoved(b"", (h[1],))]
    index.subscribe(None)
    index.insert([7, 7], [5])
    index.flush_events()
    assert len(batches) == 2
