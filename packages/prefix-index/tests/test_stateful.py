"""Random operation sequences against a naive reference model (full scans, no heaps)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from prefix_index import (
    BlockStored,
    Cleared,
    HybridPolicy,
    IndexEvent,
    LFUPolicy,
    LRUPolicy,
    PrefixIndex,
    PrefixTracker,
    block_hashes,
)
from prefix_index.policy import BlockAccess, EvictionPolicy

B = 2
TTL = 5.0
NAMESPACES = [b"", b"tenant"]
prompts = st.lists(st.integers(0, 2), min_size=0, max_size=9)


@dataclass
class RefBlock:
    handle: int
    seq: int
    refcount: int = 0
    hits: int = 0
    last_access: int = 0
    last_time: float = 0.0
    priority: float = 0.0


class ReferenceIndex:
    """The contract of DESIGN.md written the slow, obvious way."""

    def __init__(self, policy: EvictionPolicy) -> None:
        self.policy = policy
        self.blocks: dict[tuple[bytes, tuple[int, ...]], RefBlock] = {}
        self.tick = 0
        self.seq = 0
        self.baseline = 0.0

    def path(self, ns: bytes, tokens: list[int]) -> list[tuple[bytes, tuple[int, ...]]]:
        keys = []
        for i in range(len(tokens) // B):
            key = (ns, tuple(tokens[: (i + 1) * B]))
            if key not in self.blocks:
                break
            keys.append(key)
        return keys

    def touch(self, blk: RefBlock, now: float) -> None:
        blk.last_access = self.tick
        blk.last_time = now
        blk.priority = self.policy.priority(BlockAccess(blk.hits, self.tick), self.baseline)

    def is_leaf(self, key: tuple[bytes, tuple[int, ...]]) -> bool:
        ns, prefix = key
        return not any(
            k[0] == ns and len(k[1]) == len(prefix) + B and k[1][: len(prefix)] == prefix
            for k in self.blocks
        )

    def candidates(self) -> list[tuple[bytes, tuple[int, ...]]]:
        return [k for k, b in self.blocks.items() if b.refcount == 0 and self.is_leaf(k)]

    def match(self, ns: bytes, tokens: list[int], now: float) -> list[int]:
        keys = self.path(ns, tokens)
        self.tick += 1
        for k in keys:
            self.blocks[k].hits += 1
            self.touch(self.blocks[k], now)
        return [self.blocks[k].handle for k in keys]

    def insert(self, ns: bytes, tokens: list[int], handles: list[int], now: float) -> list[int]:
        keys = self.path(ns, tokens)
        new = handles[len(keys) :]
        used = {b.handle for b in self.blocks.values()}
        if len(set(new)) != len(new) or used & set(new):
            raise ValueError
        self.tick += 1
        returned = []
        for i, k in enumerate(keys):
            blk = self.blocks[k]
            self.touch(blk, now)  # recency and TTL; the hit was counted by match
            if blk.handle != handles[i]:
                returned.append(handles[i])
        for i in range(len(keys), len(handles)):
            blk = RefBlock(handles[i], self.seq, hits=1)
            self.seq += 1
            self.touch(blk, now)
            self.blocks[(ns, tuple(tokens[: (i + 1) * B]))] = blk
        return returned

    def by_handle(self, handle: int) -> RefBlock:
        return next(b for b in self.blocks.values() if b.handle == handle)

    def release(self, handles: list[int], now: float) -> None:
        self.tick += 1
        for h in handles:
            blk = self.by_handle(h)
            blk.refcount -= 1
            if blk.refcount == 0:
                self.touch(blk, now)

    def evict(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            cands = self.candidates()
            if not cands:
                break
            k = min(
                cands,
                key=lambda k: (
                    self.blocks[k].priority,
                    self.blocks[k].last_access,
                    self.blocks[k].seq,
                ),
            )
            self.baseline = max(self.baseline, self.blocks[k].priority)
            out.append(self.blocks.pop(k).handle)
        return out

    def expire(self, now: float) -> list[int]:
        out = []
        while True:
            cands = [k for k in self.candidates() if self.blocks[k].last_time + TTL <= now]
            if not cands:
                return out
            k = min(
                cands,
                key=lambda k: (
                    self.blocks[k].last_time,
                    self.blocks[k].last_access,
                    self.blocks[k].seq,
                ),
            )
            out.append(self.blocks.pop(k).handle)


class IndexMachine(RuleBasedStateMachine):
    policy: EvictionPolicy = HybridPolicy()

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.index = PrefixIndex(B, policy=self.policy, ttl=TTL, clock=lambda: self.now)
        self.ref = ReferenceIndex(self.policy)
        self.next_handle = 0
        # A router's view, fed only by the index's event batches.
        self.tracker = PrefixTracker()
        self.index.subscribe(self._deliver)
        self.batches = 0

    def _deliver(self, events: list[IndexEvent]) -> None:
        self.batches += 1
        self.tracker.apply("r", events)

    @rule(ns=st.sampled_from(NAMESPACES), tokens=prompts)
    def peek(self, ns: bytes, tokens: list[int]) -> None:
        assert self.index.peek(tokens, ns) == len(self.ref.path(ns, tokens)) * B
        expect = [self.ref.blocks[k].handle for k in self.ref.path(ns, tokens)]
        assert self.index.lookup(tokens, ns).handles == expect
        hashes = block_hashes(tokens, B, ns)
        assert self.index.peek_hashes(hashes, ns) == len(expect) * B

    @rule(ns=st.sampled_from(NAMESPACES), tokens=prompts, give_hashes=st.booleans())
    def match(self, ns: bytes, tokens: list[int], give_hashes: bool) -> None:
        expect = self.ref.match(ns, tokens, self.now)
        hashes = None
        if give_hashes:
            hashes = self.index.match(tokens, ns).hashes  # also a match: mirror it
            self.ref.match(ns, tokens, self.now)
        m = self.index.match(tokens, ns, hashes=hashes)
        assert m.handles == expect and m.num_tokens == len(expect) * B

    @rule(ns=st.sampled_from(NAMESPACES), tokens=prompts, reuse=st.integers(0, 3))
    def insert(self, ns: bytes, tokens: list[int], reuse: int) -> None:
        n = len(tokens) // B
        handles = list(range(self.next_handle, self.next_handle + n))
        self.next_handle += n
        existing = sorted(b.handle for b in self.ref.blocks.values())
        if reuse and existing and handles:  # sometimes an already-used handle: must raise
            handles[-1] = existing[reuse % len(existing)]
        try:
            expect: list[int] | None = self.ref.insert(ns, tokens, handles, self.now)
        except ValueError:
            expect = None
        if expect is None:
            with pytest.raises(ValueError):
                self.index.insert(tokens, handles, ns)
        else:
            assert self.index.insert(tokens, handles, ns) == expect

    @precondition(lambda self: self.ref.blocks)
    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        handles = data.draw(
            st.lists(
                st.sampled_from(sorted(b.handle for b in self.ref.blocks.values())), max_size=3
            )
        )
        self.index.acquire(handles)
        for h in handles:
            self.ref.by_handle(h).refcount += 1

    @precondition(lambda self: any(b.refcount for b in self.ref.blocks.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = sorted(b.handle for b in self.ref.blocks.values() if b.refcount)
        handles = data.draw(st.lists(st.sampled_from(held), max_size=3, unique=True))
        self.index.release(handles)
        self.ref.release(handles, self.now)

    @rule()
    def release_below_zero_raises(self) -> None:
        free = [b.handle for b in self.ref.blocks.values() if b.refcount == 0]
        if free:
            with pytest.raises(ValueError):
                self.index.release(free[:1])

    @rule(n=st.integers(0, 4))
    def evict(self, n: int) -> None:
        assert self.index.evict(n) == self.ref.evict(n)

    @rule(dt=st.floats(0, 4))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def expire(self) -> None:
        assert sorted(self.index.expire()) == sorted(self.ref.expire(self.now))

    @rule(ns=st.sampled_from([None, *NAMESPACES]))
    def clear(self, ns: bytes | None) -> None:
        got = sorted(self.index.clear(ns))
        # Reference: remove unreferenced blocks whose descendants are all unreferenced.
        in_scope = {k for k in self.ref.blocks if ns is None or k[0] == ns}
        held = [k for k in in_scope if self.ref.blocks[k].refcount]
        keep = {
            k for k in in_scope if any(h[0] == k[0] and h[1][: len(k[1])] == k[1] for h in held)
        }
        expect = sorted(self.ref.blocks.pop(k).handle for k in in_scope - keep)
        assert got == expect

    @rule(tokens=prompts)
    def flush_events(self, tokens: list[int]) -> None:
        self.index.flush_events()
        assert self.tracker.num_blocks("r") == len(self.ref.blocks)
        for ns, prefix in [*self.ref.blocks, *((ns, tuple(tokens)) for ns in NAMESPACES)]:
            hashes = block_hashes(list(prefix), B, ns)
            assert self.tracker.match("r", ns, hashes) == len(self.ref.path(ns, list(prefix)))

    @rule()
    def resubscribe(self) -> None:
        # A late subscriber starts from a snapshot and agrees from its first batch on.
        self.tracker = PrefixTracker()
        self.tracker.apply("r", [Cleared(None), BlockStored(b"", (b"stale-hash-0123",), None)])
        self.index.subscribe(self._deliver)

    @invariant()
    def same_blocks_and_counts(self) -> None:
        assert len(self.index) == len(self.ref.blocks)
        for blk in self.ref.blocks.values():
            assert blk.handle in self.index
            assert self.index.refcount(blk.handle) == blk.refcount
        s = self.index.stats()
        assert s.referenced_blocks == sum(1 for b in self.ref.blocks.values() if b.refcount)
        assert s.cached_blocks == len(self.ref.blocks)

    @invariant()
    def tree_is_consistent(self) -> None:
        seen = 0
        for root in self.index._roots.values():
            assert root.children, "empty namespace roots are dropped"
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                seen += 1
                assert node.alive and self.index._by_handle[node.handle] is node
                assert node.parent is not None and node.parent.children[node.hash] is node
                stack.extend(node.children.values())
        assert seen == len(self.index)


class LRUMachine(IndexMachine):
    policy = LRUPolicy()


class LFUMachine(IndexMachine):
    policy = LFUPolicy()


TestHybrid = IndexMachine.TestCase
TestLRU = LRUMachine.TestCase
TestLFU = LFUMachine.TestCase
