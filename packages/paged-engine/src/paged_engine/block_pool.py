"""Accounting of the KV cache's blocks: which are free, which are cached, and who holds the rest."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from prefix_index import CachedBlock, Match, PrefixIndex

__all__ = ["BlockPool", "NoFreeBlocksError"]


class NoFreeBlocksError(RuntimeError):
    """Raised by ``allocate`` when fewer blocks are available than asked for."""


class BlockPool:
    """Hands out KV block ids, takes them back, and (with an index) keeps finished work cached.

    Every block is in exactly one state:

    - *free*: on the free list, holding nothing anyone will read;
    - *used*: reference count >= 1, held by running or preempted-but-listed sequences;
    - *cached*: reference count 0 but published in the prefix ``index``, reusable by a later
      prompt with the same tokens; evicted (by the index's policy) when the free list runs dry,
      or expired by its TTL.

    With an index, a block published by a sequence is acquired in the index as long as the
    pool holds it, so the index's reference count of a published block always equals the pool's
    and the index never evicts a block in use. A sequence's published blocks always form one
    chain from the root (a block the index already caches under another id is swapped for the
    cached one), so every cached block can eventually be evicted, leaves first.

    Allocation takes the oldest free block first, so recently freed blocks are reused last.
    ``on_evict``, when set, sees the blocks the index evicts before their memory is reused
    (a second cache tier copies them out).
    """

    def __init__(self, num_blocks: int, block_size: int, index: PrefixIndex | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        if index is not None and index.block_size != block_size:
            raise ValueError(
                f"the prefix index uses {index.block_size}-token blocks but the pool {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.index = index
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.num_evicted = 0
        self.num_expired = 0
        self.on_evict: Callable[[list[CachedBlock]], object] | None = None

    # -- queries --------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks held only by the prefix cache (reference count 0, reusable, evictable)."""
        if self.index is None:
            return 0
        return len(self.index) - self.index.stats().referenced_blocks

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
        """Take ``n`` blocks, each with reference count 1, evicting cached blocks when the free
        list is short; or raise NoFreeBlocksError (and take nothing)."""
        if n > self.num_available():
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {self.num_available()} available")
        short = n - len(self._free)
        if short > 0 and self.index is not None:
            if self.on_evict is None:
                evicted = self.index.evict(short)
            else:
                blocks = self.index.evict_blocks(short)
                self.on_evict(blocks)
                evicted = [b.handle for b in blocks]
            self.num_evicted += len(evicted)
            self._free.extend(evicted)
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref_counts[b] = 1
        return out

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block. A block nobody references becomes free, or stays
        cached when the index holds it (then it counts as used now for recency and TTL)."""
        published: list[int] = []
        for b in block_ids:
            rc = self._ref_counts[b]
            if rc <= 0:
                raise RuntimeError(f"KV block {b} released more often than acquired")
            self._ref_counts[b] = rc - 1
            if self.index is not None and b in self.index:
                published.append(b)
            elif rc == 1:
                self._free.append(b)
        if published:
            assert self.index is not None
            self.index.release(published)

    # -- prefix cache ---------------------------------------------------------------------------

    def match(self, tokens: list[int], namespace: bytes, hashes: list[bytes]) -> Match:
        """The longest cached chain for ``tokens`` (pass only the tokens that may be reused),
        touching it for the eviction policy. ``hashes`` are the blocks' chained hashes."""
        if self.index is None:
            return Match([], 0, [])
        n = len(tokens) // self.block_size
        return self.index.match(tokens[: n * self.block_size], namespace, hashes[:n])

    def acquire(self, block_ids: list[int]) -> None:
        """Add one reference to each cached or used block (a sequence reusing a cache hit)."""
        for b in block_ids:
            if self._ref_counts[b] == 0 and (self.index is None or b not in self.index):
                raise RuntimeError(f"KV block {b} is free; only cached or used blocks are shared")
        for b in block_ids:
            self._ref_counts[b] += 1
        if self.index is not None:
            self.index.acquire(block_ids)

    def publish(
        self, block_ids: list[int], tokens: list[int], namespace: bytes, hashes: list[bytes]
    ) -> list[int]:
        """Publish a sequence's full, computed blocks (``len(hashes)`` of them, with their
        chained hashes) to the index; returns the sequence's block list to use from now on.

        A block the index already caches under another id (the same prefix computed twice) is
        swapped for the cached one and the duplicate released, so the sequence's blocks stay a
        single chain of the index. A block that cannot be placed (a hash collision) stays the
        sequence's own, unpublished. Cost: O(blocks of the sequence).
        """
        if self.index is None or not hashes:
            return block_ids
        n = len(hashes)
        full_tokens = tokens[: n * self.block_size]
        not_adopted = self.index.insert(full_tokens, block_ids[:n], namespace, hashes)
        out = list(block_ids)
        if not_adopted:
            cached = self.index.lookup(full_tokens, namespace, hashes).handles
            for i, h in enumerate(cached):
                if h != out[i]:
                    self.acquire([h])
                    self.release([out[i]])
                    out[i] = h
        # Newly adopted blocks enter the index unreferenced: mirror the pool's count there.
        adopted = [b for b in out[:n] if b in self.index and self.index.refcount(b) == 0]
        if adopted:
            self.index.acquire(adopted)
        return out

    def expire(self) -> int:
        """Free cached blocks idle past the index's TTL; returns how many. O(expired)."""
        if self.index is None or self.index.ttl is None:
            return 0
        expired = self.index.expire()
        self._free.extend(expired)
        self.num_expired += len(expired)
        return len(expired)

    def clear_cache(self, namespace: bytes | None = None) -> int:
        """Free every cached (unreferenced) block, of one namespace or all; returns how many."""
        if self.index is None:
            return 0
        cleared = self.index.clear(namespace)
        self._free.extend(cleared)
        return len(cleared)

    # -- checks ---------------------------------------------------------------------------------

    def check_invariants(self, owners: Iterable[list[int]]) -> None:
        """Assert the pool's books balance against the block lists of all live sequences.

        Every block is free, cached or used; a used block's reference count equals the number
        of sequences that list it (and the index's count when published); free blocks are listed
        once, referenced by nobody and not in the index; cached blocks are referenced by nobody.
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
            cached = self.index is not None and b in self.index
            if b in free_set and (counts[b] or cached):
                raise AssertionError(f"KV block {b} is free but owned or cached")
            if b not in free_set and not counts[b] and not cached:
                raise AssertionError(f"KV block {b} is neither free, cached nor owned (a leak)")
            if cached and self.index is not None and self.index.refcount(b) != counts[b]:
                raise AssertionError(
                    f"KV block {b}: index reference count {self.index.refcount(b)}, owned "
                    f"{counts[b]} times"
                )
        if self.num_free + self.num_cached + self.num_used != self.num_blocks:
            raise AssertionError("free + cached + used != total KV blocks")
        used = sum(1 for c in counts if c)
        if used != self.num_used:
            raise AssertionError(
                f"{used} blocks are owned but the pool counts {self.num_used} used"
            )
