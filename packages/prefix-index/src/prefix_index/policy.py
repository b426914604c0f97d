"""Eviction policies: each maps a block's access history to a priority (lowest goes first).

A priority is computed only when a block is touched (matched, inserted) or released, and never
changes between touches, so the index can keep unreferenced leaves in a heap and evict by
popping it. Ageing comes from ``baseline``: the priority of the last evicted block (GreedyDual),
which only grows. Ties are broken by recency (a logical clock), then by creation order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockAccess:
    """What a policy may look at: ``hits`` counts the block's insert and its matches;
    ``last_access`` is the logical clock tick of its latest touch or release."""

    hits: int
    last_access: int


class EvictionPolicy(ABC):
    """A pluggable eviction policy. Subclass and implement :meth:`priority`."""

    name: str = "custom"

    @abstractmethod
    def priority(self, access: BlockAccess, baseline: float) -> float:
        """Priority of a block; lower is evicted sooner. Recency breaks ties.

        ``baseline`` is the priority of the most recently evicted block (0.0 at first)."""


class LRUPolicy(EvictionPolicy):
    """Least recently used: a constant priority, so only recency orders blocks."""

    name = "lru"

    def priority(self, access: BlockAccess, baseline: float) -> float:
        return 0.0


class LFUPolicy(EvictionPolicy):
    """Least frequently used: fewest hits go first; among equals the least recent."""

    name = "lfu"

    def priority(self, access: BlockAccess, baseline: float) -> float:
        return float(access.hits)


class HybridPolicy(EvictionPolicy):
    """Recency with a frequency bonus that ages (GreedyDual-Frequency, with a capped bonus).

    ``priority = baseline + min(frequency_weight * hits, max_bonus)``. Every cached block has
    at least one hit (its insert), so the baseline -- the priority of the last evicted block --
    rises by about one per turnover of the cache. A block touched now starts at the current
    baseline, ahead of everything touched earlier (recency); a block hit ``k`` times survives
    about ``k`` turnovers of one-off traffic after its last use, so a scan cannot flush a hot
    system prompt, yet a formerly hot block ages out once it stops being used (``max_bonus``
    bounds how long).
    """

    name = "hybrid"

    def __init__(self, frequency_weight: float = 1.0, max_bonus: float = 32.0) -> None:
        if not frequency_weight >= 0:
            raise ValueError(f"frequency_weight must be >= 0, got {frequency_weight!r}")
        if not max_bonus >= 0:
            raise ValueError(f"max_bonus must be >= 0, got {max_bonus!r}")
        self.frequency_weight = frequency_weight
        self.max_bonus = max_bonus

    def priority(self, access: BlockAccess, baseline: float) -> float:
        return baseline + min(self.frequency_weight * access.hits, self.max_bonus)


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "hybrid": HybridPolicy,
}


def make_policy(policy: str | EvictionPolicy) -> EvictionPolicy:
    """Resolve a policy name (``lru``, ``lfu``, ``hybrid``) or pass an instance through."""
    if isinstance(policy, EvictionPolicy):
        return policy
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]()
    raise ValueError(
        f"unknown eviction policy {policy!r}; use one of {sorted(POLICIES)} "
        "or an EvictionPolicy instance"
    )
