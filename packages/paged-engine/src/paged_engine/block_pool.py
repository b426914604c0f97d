"""Accounting of the KV cache's blocks: which are free, and who holds the rest."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

__all__ = ["BlockPool", "NoFreeBlocksError"]


class NoFreeBlocksError(RuntimeError):
    """Raised by ``allocate`` when fewer blocks are available than asked for."""


class BlockPool:
    """Hands out KV block ids and takes them back.

    Every block is in exactly one state: *free* (on the free list), *used* (reference count >= 1:
    owned by running sequences) or *cached* (reference count 0 but kept because a prefix cache
    still maps a token prefix to it; evicted when the free list runs dry). This pool has no
    cache attached yet, so ``num_cached`` is 0 and a released block goes straight back to the
    free list; a prefix index plugs in through ``release`` (publish instead of free) and
    ``allocate`` (evict when the free list is empty) without changing callers.

    Allocation order is FIFO over the free list, so recently freed blocks are reused last.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    # -- queries --------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return 0

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free - self.num_cached

    def num_available(self) -> int:
        """Blocks ``allocate`` can hand out now (free, plus cached ones it may evict)."""
        return self.num_free + self.num_cached

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_available()

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    # -- changes --------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, each with reference count 1, or raise NoFreeBlocksError."""
        if n > self.num_available():
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {self.num_available()} available")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref_counts[b] = 1
        return out

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; a block nobody references becomes free."""
        for b in block_ids:
            rc = self._ref_counts[b]
            if rc <= 0:
                raise RuntimeError(f"KV block {b} released more often than acquired")
            self._ref_counts[b] = rc - 1
            if rc == 1:
                self._free.append(b)

    # -- checks ---------------------------------------------------------------------------------

    def check_invariants(self, owners: Iterable[list[int]]) -> None:
        """Assert the pool's books balance against the block lists of all live sequences.

        Every block is free, cached or used; a used block's reference count equals the number
        of sequences that list it; free blocks are listed once and referenced by nobody.
        """
        counts = [0] * self.num_blocks
        for blocks in owners:
            for b in blocks:
                counts[b] += 1
        free = list(self._free)
        free_set = set(free)
        if len(free) != len(free_set):
            raise AssertionError("a KV block appears twice on the free list")
        for b in range(self.num_blocks):
            if counts[b] != self._ref_counts[b]:
                raise AssertionError(
                    f"KV block {b}: reference count {self._ref_counts[b]}, owned {counts[b]} times"
                )
            if (b in free_set) == (counts[b] > 0):
                raise AssertionError(f"KV block {b} is both free and owned, or neither")
        if self.num_free + self.num_cached + self.num_used != self.num_blocks:
            raise AssertionError("free + cached + used != total KV blocks")
