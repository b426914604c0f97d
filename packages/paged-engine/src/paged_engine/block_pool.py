"""Accounting of the KV cache's blocks: which are free, which are cached, and who holds the rest."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable

from prefix_index import CachedBlock, EventSubscriber, PrefixIndex

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

    The pool owns every block's reference count. The prefix index only knows whether a cached
    block is in use: its count there is 1 while the pool's is at least 1, else 0, so the index
    never evicts a block in use. A sequence's published blocks always form one chain from the
    root (a block the index already caches under another id is swapped for the cached one), so
    every cached block can eventually be evicted, leaves first. Callers reach the index only
    through the pool (``peek``, ``cached_blocks``, ``reuse``, ``publish``).

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
        self._index = index
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.num_evicted = 0
        self.num_expired = 0
        self.on_evict: Callable[[list[CachedBlock]], object] | None = None

    # -- queries --------------------------------------------------------------------------------

    @property
    def caching(self) -> bool:
        """True when a prefix index keeps finished work cached."""
        return self._index is not None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks held only by the prefix cache (reference count 0, reusable, evictable)."""
        if self._index is None:
            return 0
        return len(self._index) - self._index.stats().referenced_blocks

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
        if short > 0 and self._index is not None:
            if self.on_evict is None:
                evicted = self._index.evict(short)
            else:
                blocks = self._index.evict_blocks(short)
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
        unused: list[int] = []
        for b in block_ids:
            rc = self._ref_counts[b]
            if rc <= 0:
                raise RuntimeError(f"KV block {b} released more often than acquired")
            self._ref_counts[b] = rc - 1
            if rc > 1:
                continue
            if self._index is not None and b in self._index:
                unused.append(b)
            else:
                self._free.append(b)
        if unused:
            assert self._index is not None
            self._index.release(unused)

    def pin(self, block_ids: list[int]) -> None:
        """Take one reference to each cached or used block without touching it for the
        eviction policy (the caller releases them): a second tier extending a cached chain
        keeps it from being evicted meanwhile."""
        self._acquire(block_ids)

    def cached_chain(self, namespace: bytes | None = None) -> list[CachedBlock]:
        """Every block the prefix cache holds (of one namespace, or all), parents before
        children, described for a second tier; empty without prefix caching."""
        return [] if self._index is None else self._index.blocks(namespace)

    def _acquire(self, block_ids: list[int]) -> None:
        """Add one reference to each cached or used block (a sequence reusing a cache hit)."""
        for b in block_ids:
            if self._ref_counts[b] == 0 and (self._index is None or b not in self._index):
                raise RuntimeError(f"KV block {b} is free; only cached or used blocks are shared")
        newly_used = [b for b in block_ids if self._ref_counts[b] == 0]
        for b in block_ids:
            self._ref_counts[b] += 1
        if newly_used and self._index is not None:
            self._index.acquire(newly_used)

    # -- prefix cache ---------------------------------------------------------------------------

    def subscribe(self, subscriber: EventSubscriber | None) -> None:
        """Send the index's events to ``subscriber`` (``PrefixIndex.subscribe``); ValueError
        without an index."""
        if self._index is None:
            raise ValueError("prefix caching is off (enable_prefix_caching=False): no cache events")
        self._index.subscribe(subscriber)

    def flush_events(self) -> None:
        """Deliver the index's pending events in one batch (nothing without a subscriber)."""
        if self._index is not None:
            self._index.flush_events()

    def peek(self, hashes: list[bytes], namespace: bytes) -> int:
        """Cached tokens of the chain ``hashes`` by hash alone (a heuristic: no verification,
        no side effects)."""
        return 0 if self._index is None else self._index.peek_hashes(hashes, namespace)

    def cached_blocks(self, tokens: list[int], namespace: bytes, hashes: list[bytes]) -> list[int]:
        """Block ids of the longest cached chain of ``tokens`` (``hashes``: its full blocks'
        chained hashes), verified token by token; no side effects."""
        if self._index is None or not hashes:
            return []
        n = len(hashes)
        return self._index.lookup(tokens[: n * self.block_size], namespace, hashes).handles

    def reuse(self, tokens: list[int], namespace: bytes, hashes: list[bytes]) -> list[int]:
        """Take one reference to each block of the cached chain of ``tokens`` (``hashes``: the
        chained hashes of the blocks to reuse) and touch them for the eviction policy; returns
        their ids. The caller checked with ``cached_blocks`` that they are there."""
        if self._index is None or not hashes:
            return []
        n = len(hashes)
        handles = self._index.match(tokens[: n * self.block_size], namespace, hashes).handles
        self._acquire(handles)
        return handles

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
        if self._index is None or not hashes:
            return block_ids
        n = len(hashes)
        full_tokens = tokens[: n * self.block_size]
        not_adopted = self._index.insert(full_tokens, block_ids[:n], namespace, hashes)
        out = list(block_ids)
        if not_adopted:
            cached = self._index.lookup(full_tokens, namespace, hashes).handles
            for i, h in enumerate(cached):
                if h != out[i]:
                    self._acquire([h])
                    self.release([out[i]])
                    out[i] = h
        # Newly adopted blocks enter the index unreferenced: mark them in use.
        adopted = [b for b in out[:n] if b in self._index and self._index.refcount(b) == 0]
        if adopted:
            self._index.acquire(adopted)
        return out

    def expire(self) -> int:
        """Free cached blocks idle past the index's TTL; returns how many. O(expired)."""
        if self._index is None or self._index.ttl is None:
            return 0
        expired = self._index.expire()
        self._free.extend(expired)
        self.num_expired += len(expired)
        return len(expired)

    def clear_cache(self, namespace: bytes | None = None) -> int:
        """Free every cached (unreferenced) block, of one namespace or all; returns how many."""
        if self._index is None:
            return 0
        cleared = self._index.clear(namespace)
        self._free.extend(cleared)
        return len(cleared)

    # -- checks ---------------------------------------------------------------------------------

    def check_invariants(self, owners: Iterable[list[int]]) -> None:
        """Assert the pool's books balance against the block lists of all live sequences.

        Every block is free, cached or used; a used block's reference count equals the number
        of sequences that list it (the index's count is 1 when published); free blocks are listed
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
            cached = self._index is not None and b in self._index
            if b in free_set and (counts[b] or cached):
                raise AssertionError(f"KV block {b} is free but owned or cached")
            if b not in free_set and not counts[b] and not cached:
                raise AssertionError(f"KV block {b} is neither free, cached nor owned (a leak)")
            if cached and self._index is not None and self._index.refcount(b) != min(counts[b], 1):
                raise AssertionError(
                    f"KV block {b}: index reference count {self._index.refcount(b)}, owned "
                    f"{counts[b]} times (the index counts in use as 1)"
                )
        if self.num_free + self.num_cached + self.num_used != self.num_blocks:
            raise AssertionError("free + cached + used != total KV blocks")
        used = sum(1 for c in counts if c)
        if used != self.num_used:
            raise AssertionError(
                f"{used} blocks are owned but the pool counts {self.num_used} used"
            )
