"""Counters an index keeps about its own use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IndexStats:
    """A snapshot of an index's counters.

    ``queried_tokens`` / ``hit_tokens`` count the tokens passed to and found by ``match``
    (``peek`` counts nothing); the rest count blocks."""

    queries: int
    queried_tokens: int
    hit_tokens: int
    cached_blocks: int
    referenced_blocks: int
    inserted_blocks: int
    evicted_blocks: int
    expired_blocks: int
    cleared_blocks: int

    @property
    def hit_rate(self) -> float:
        """Hit tokens over queried tokens; 0.0 before any query."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    @property
    def unreferenced_blocks(self) -> int:
        """Cached blocks nobody holds: what eviction may reclaim (leaves first)."""
        return self.cached_blocks - self.referenced_blocks
