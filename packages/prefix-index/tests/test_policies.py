"""Eviction policies on crafted access patterns, driven like an engine drives the index."""

from __future__ import annotations

import pytest

from prefix_index import BlockAccess, EvictionPolicy, HybridPolicy, PrefixIndex

B = 4


class BoundedCache:
    """An engine's use of the index with room for ``capacity`` blocks: match, acquire, fill the
    uncached blocks (evicting when the free list is empty), publish, release."""

    def __init__(self, capacity: int, policy: str | EvictionPolicy) -> None:
        self.index = PrefixIndex(B, policy=policy)
        self.free = list(range(capacity))

    def request(self, tokens: list[int]) -> int:
        m = self.index.match(tokens)
        self.index.acquire(m.handles)
        need = len(tokens) // B - len(m.handles)
        if need > len(self.free):
            self.free += self.index.evict(need - len(self.free))
        assert need <= len(self.free), "capacity too small for one request"
        new = [self.free.pop() for _ in range(need)]
        self.free += self.index.insert(tokens, m.handles + new)
        self.index.release(m.handles)
        return m.num_tokens


SYSTEM = [1000 + i for i in range(4 * B)]  # a 4-block system prompt


def question(i: int) -> list[int]:
    return [2000 + i] * B


def one_off(i: int) -> list[int]:
    return [5000 + 10 * i + j for j in range(3 * B)]  # 3 unique blocks


def run_scan(policy: str | EvictionPolicy, scan_len: int) -> BoundedCache:
    cache = BoundedCache(capacity=16, policy=policy)
    for i in range(20):  # the system prompt is hot
        cache.request(SYSTEM + question(i))
    for i in range(scan_len):  # then a scan of one-off prompts, many times the capacity
        cache.request(one_off(i))
    return cache


@pytest.mark.parametrize("policy", ["lfu", "hybrid"])
def test_frequency_policies_keep_a_hot_system_prompt_through_a_scan(policy: str) -> None:
    cache = run_scan(policy, scan_len=40)  # 120 one-off blocks through 16 slots
    assert cache.index.peek(SYSTEM) == len(SYSTEM)
    assert cache.request(SYSTEM + question(99)) == len(SYSTEM)


def test_lru_drops_the_system_prompt_in_the_same_scan() -> None:
    cache = run_scan("lru", scan_len=40)
    assert cache.index.peek(SYSTEM) == 0


def test_hybrid_bonus_ages_out_but_lfu_never_does() -> None:
    # A long scan after the system prompt stops being used: hybrid lets it go (recency wins
    # in the end), lfu keeps it forever.
    assert run_scan("hybrid", scan_len=600).index.peek(SYSTEM) == 0
    assert run_scan("lfu", scan_len=600).index.peek(SYSTEM) == len(SYSTEM)


def test_lru_order_is_recency() -> None:
    idx = PrefixIndex(B, policy="lru")
    for h in range(3):
        idx.insert([h] * B, [h])
    idx.match([0] * B)
    assert idx.evict(3) == [1, 2, 0]


def test_lfu_order_is_hits_then_recency() -> None:
    idx = PrefixIndex(B, policy="lfu")
    for h in range(3):
        idx.insert([h] * B, [h])
    for _ in range(2):
        idx.match([0] * B)
    idx.match([2] * B)
    assert idx.evict(3) == [1, 2, 0]


def test_hybrid_prefers_recent_among_equally_used() -> None:
    idx = PrefixIndex(B)
    for h in range(3):
        idx.insert([h] * B, [h])
    assert idx.evict(3) == [0, 1, 2]


def test_release_refreshes_recency() -> None:
    idx = PrefixIndex(B, policy="lru")
    idx.insert([0] * B, [0])
    idx.insert([1] * B, [1])
    idx.acquire([0])
    idx.release([0])
    assert idx.evict(2) == [1, 0]


class MostRecentFirst(EvictionPolicy):
    """A user policy: evict the most recently used block first."""

    name = "mru"

    def priority(self, access: BlockAccess, baseline: float) -> float:
        return -float(access.last_access)


def test_custom_policy_is_honoured() -> None:
    idx = PrefixIndex(B, policy=MostRecentFirst())
    for h in range(3):
        idx.insert([h] * B, [h])
    assert idx.evict(3) == [2, 1, 0]


def test_hybrid_validates_parameters() -> None:
    with pytest.raises(ValueError, match="frequency_weight"):
        HybridPolicy(frequency_weight=-1)
    with pytest.raises(ValueError, match="max_bonus"):
        HybridPolicy(max_bonus=float("nan"))
