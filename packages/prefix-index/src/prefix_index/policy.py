"""Eviction policies: each maps a block's access history to a priority (lowest goes first).

A priority is computed only when a block is touched (matched, inserted) or released, and never
changes between touches, so the index can keep unreferenced leaves in a heap and evict by
popping it. Ageing comes from ``baseline``: the priority of the last evicted block (GreedyDual),
which only grows. Ties are broken by recency (a logical clock), then by creation order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockAccess:
    """What a policy may look at: ``hits`` counts inserts and matches of the block;
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
    """Recency with a frequency bonus that ages (GreedyDual-Frequency).

    ``priority = baseline + frequency_weight * log2(1 + hits)``. A block touched now starts at
    the current baseline, which rises as blocks are evicted, so old blocks fall behind new ones
    (recency); a block hit often holds a bonus of several cache turnovers, so a scan of one-off
    prompts (one hit each) cannot flush it, yet a formerly hot block ages out once unused.
    """

    name = "hybrid"

    def __init__(self, frequency_weight: float = 1.0) -> None:
        if not frequency_weight >= 0:
            raise ValueError(f"frequency_weight must be >= 0, got {frequency_weight!r}")
        self.frequency_weight = frequency_weight

    def priority(self, access: BlockAccess, baseline: float) -> float:
        return baseline + self.frequency_weight * math.log2(1 + access.hits)


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
