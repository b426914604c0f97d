"""``PrefixIndex``: a radix tree of full KV blocks keyed by chained block hashes."""

from __future__ import annotations

import heapq
import itertools
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .events import BlockRemoved, BlockStored, Cleared, EventSubscriber, IndexEvent
from .hashing import Hasher, Tokens, default_hasher, namespace_seed, pack_tokens
from .policy import BlockAccess, EvictionPolicy, make_policy
from .stats import IndexStats


@dataclass(frozen=True)
class Match:
    """The longest cached chain of a prompt: ``handles[i]`` caches block ``i``, ``hashes[i]`` is
    its chained hash (pass it as ``parent`` to continue hashing), ``num_tokens`` =
    ``len(handles) * block_size``."""

    handles: list[int]
    num_tokens: int
    hashes: list[bytes]


@dataclass(eq=False)
class _Node:
    """One cached block (or a namespace's root, which has ``handle`` -1 and no tokens)."""

    hash: bytes
    block: bytes  # the block's token ids, packed: a hash hit is confirmed byte for byte
    handle: int
    parent: _Node | None
    namespace: bytes
    seq: int  # creation order: the last tie-breaker, so ordering is deterministic
    children: dict[bytes, _Node] = field(default_factory=dict)
    refcount: int = 0
    hits: int = 0
    last_access: int = 0
    last_used_time: float = 0.0
    touch_baseline: float = 0.0  # the eviction baseline when last touched: fixes its priority
    version: int = 0  # bumped on every heap push; older heap entries are stale
    alive: bool = True


@dataclass(frozen=True)
class CachedBlock:
    """A cached block as a second tier needs it: ``hash`` (chained), ``parent_hash`` (None for a
    namespace's first block), its ``tokens`` and the caller's ``handle``."""

    handle: int
    namespace: bytes
    hash: bytes
    parent_hash: bytes | None
    tokens: list[int]


def _describe(node: _Node) -> CachedBlock:
    parent = node.parent
    parent_hash = parent.hash if parent is not None and parent.parent is not None else None
    tokens = list(struct.unpack(f"<{len(node.block) // 4}i", node.block))
    return CachedBlock(node.handle, node.namespace, node.hash, parent_hash, tokens)


_HeapEntry = tuple[float, int, int, int, _Node]  # (key, tie, seq, version, node)


class PrefixIndex:
    """A radix index of KV blocks. Edges are full blocks of ``block_size`` tokens.

    Each cached block carries an opaque integer ``handle`` chosen by the caller (a KV block id),
    a reference count and access statistics. Contract:

    - A hash hit is always verified token by token, and only along a verified path, so a
      returned handle always caches exactly the prompt's tokens (also under hash collisions).
    - A block with a reference count above zero is never evicted nor expired, and a parent is
      never removed before its children.
    - Every operation costs O(blocks touched), plus O(log n) per evicted or expired block.
    - Namespaces (tenant salts) never share blocks.

    ``policy`` is ``"lru"``, ``"lfu"``, ``"hybrid"`` or an :class:`EvictionPolicy`. ``ttl``
    (seconds, or None) expires unreferenced blocks idle that long, measured with ``clock``
    from their last match, insert or release. ``hasher`` replaces xxh3-128 (tests inject
    colliding hashers with it). ``subscribe`` / ``flush_events`` publish the index's changes in
    batches (``prefix_index.events``).
    """

    def __init__(
        self,
        block_size: int,
        policy: str | EvictionPolicy = "hybrid",
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        hasher: Hasher | None = None,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        self.block_size = block_size
        self.policy = make_policy(policy)
        self.ttl = ttl
        self.clock = clock
        self.hasher = hasher or default_hasher
        self._roots: dict[bytes, _Node] = {}
        self._seeds: dict[bytes, bytes] = {}
        self._by_handle: dict[int, _Node] = {}
        self._evict_heap: list[_HeapEntry] = []
        self._ttl_heap: list[_HeapEntry] = []
        self._tick = 0
        self._seq = itertools.count()
        self._baseline = 0.0
        self._referenced = 0
        self._queries = self._queried_tokens = self._hit_tokens = 0
        self._inserted = self._evicted = self._expired = self._cleared = 0
        self._subscriber: EventSubscriber | None = None
        self._events: list[IndexEvent] | None = None  # pending, only while subscribed

    # ----------------------------------------------------------------------------- lookups

    def __len__(self) -> int:
        """Number of cached blocks."""
        return len(self._by_handle)

    def __contains__(self, handle: object) -> bool:
        """Whether ``handle`` caches a block."""
        return handle in self._by_handle

    def refcount(self, handle: int) -> int:
        """Reference count of a cached block. Raises ``KeyError`` for an unknown handle."""
        return self._node(handle).refcount

    def peek(
        self, tokens: Tokens, namespace: bytes = b"", hashes: Sequence[bytes] | None = None
    ) -> int:
        """Number of leading tokens whose blocks are cached. No side effects at all."""
        return len(self._walk(tokens, namespace, hashes)[0]) * self.block_size

    def peek_hashes(self, hashes: Sequence[bytes], namespace: bytes = b"") -> int:
        """Number of leading tokens whose blocks are cached, judged by chained hashes alone.

        No token verification (and no packing of token ids), so it is cheaper than ``peek``
        and can be fooled by a hash collision: use it for heuristics such as scheduling order,
        never to decide what to reuse. No side effects. Cost: O(matched blocks)."""
        node = self._root(namespace, create=False)
        n = 0
        for h in hashes:
            if node is None:
                break
            node = node.children.get(h)
            if node is None:
                break
            n += 1
        return n * self.block_size

    def lookup(
        self, tokens: Tokens, namespace: bytes = b"", hashes: Sequence[bytes] | None = None
    ) -> Match:
        """What ``match`` would return, with no side effects at all (no recency, hit count,
        TTL or statistics): for a caller that inspects the cache without using it, e.g. to
        find which handle caches a block that ``insert`` did not adopt."""
        nodes, found = self._walk(tokens, namespace, hashes)
        return Match([n.handle for n in nodes], len(nodes) * self.block_size, found)

    def match(
        self, tokens: Tokens, namespace: bytes = b"", hashes: Sequence[bytes] | None = None
    ) -> Match:
        """The longest cached chain of full blocks of ``tokens`` under ``namespace``.

        Touches the matched blocks (recency, hit count, TTL idle time) and counts the query
        in the statistics, but never changes reference counts: acquire what you keep using.
        ``hashes`` may give the chained hashes of a leading part of the blocks; the rest are
        computed, only as far as the match goes. Cost: O(len(tokens)) to pack the ids in C,
        plus O(matched blocks).
        """
        nodes, found = self._walk(tokens, namespace, hashes)
        tick, now = self._next_tick(), self.clock()
        for node in nodes:
            node.hits += 1
        self._touch(nodes, tick, now)
        num_tokens = len(nodes) * self.block_size
        self._queries += 1
        self._queried_tokens += len(tokens)
        self._hit_tokens += num_tokens
        return Match([n.handle for n in nodes], num_tokens, found[: len(nodes)])

    # ----------------------------------------------------------------------------- updates

    def insert(
        self,
        tokens: Tokens,
        handles: Sequence[int],
        namespace: bytes = b"",
        hashes: Sequence[bytes] | None = None,
    ) -> list[int]:
        """Cache the full blocks of ``tokens``; ``handles[i]`` holds block ``i``.

        ``len(handles)`` must equal the number of full blocks (a trailing partial block is
        ignored). New blocks are adopted with reference count 0. Returns the handles *not*
        adopted because the block is already cached under another handle (or, after a hash
        collision, cannot be placed): the caller still owns those. A block already cached
        under the same handle is touched, neither adopted nor returned. Raises ``ValueError``
        (and changes nothing) when a handle to adopt already caches another block or repeats.
        """
        packed = pack_tokens(tokens)
        num_blocks = len(packed) // (4 * self.block_size)
        handles = list(handles)
        if len(handles) != num_blocks:
            raise ValueError(
                f"insert got {len(handles)} handles for {num_blocks} full blocks of "
                f"{self.block_size} tokens; pass exactly one handle per full block"
            )
        hashes = self._check_hashes(hashes, num_blocks)
        step = 4 * self.block_size
        node = self._root(namespace, create=False)
        # Phase 1: walk what is cached, so a bad handle can be reported before any change.
        prev = (
            self._seed(namespace) if not hashes else b""
        )  # the seed only if block 0 is hashed here
        i, path = 0, []
        while node is not None and i < num_blocks:
            block = packed[i * step : (i + 1) * step]
            h = hashes[i] if i < len(hashes) else self.hasher(prev + block)
            child = node.children.get(h)
            if child is None or child.block != block:  # a miss, or a collision
                break
            path.append(child)
            prev, node = h, child
            i += 1
        new_handles = handles[i:]
        if len(set(new_handles)) != len(new_handles):
            raise ValueError(f"insert got repeated handles {new_handles}; each block needs its own")
        for handle in new_handles:
            if handle in self._by_handle:
                raise ValueError(
                    f"handle {handle} already caches another block; a block id can hold one "
                    "block at a time (evict or clear it first)"
                )
        tick, now = self._next_tick(), self.clock()
        self._touch(path, tick, now)  # recency and TTL, but not a hit: match counted that
        not_adopted = [handles[j] for j, node in enumerate(path) if node.handle != handles[j]]
        if i == num_blocks:
            return not_adopted
        parent = path[-1] if path else self._root(namespace, create=True)
        assert parent is not None
        ns, hasher, baseline = bytes(namespace), self.hasher, self._baseline
        stored_parent = None if parent.parent is None else parent.hash
        stored: list[bytes] = []
        for j in range(i, num_blocks):
            block = packed[j * step : (j + 1) * step]
            h = hashes[j] if j < len(hashes) else hasher(prev + block)
            if h in parent.children:  # a colliding hash with other tokens: cannot be placed
                not_adopted.extend(handles[j:])
                break
            child = _Node(h, block, handles[j], parent, ns, next(self._seq), hits=1)
            child.last_access, child.last_used_time, child.touch_baseline = tick, now, baseline
            parent.children[h] = child
            self._by_handle[child.handle] = child
            self._inserted += 1
            stored.append(h)
            parent, prev = child, h
        if self._events is not None and stored:
            self._events.append(BlockStored(ns, tuple(stored), stored_parent))
        if parent.parent is not None and self._is_candidate(parent):
            self._push(parent)  # only the new chain's last block can be a leaf
        return not_adopted

    def acquire(self, handles: Iterable[int]) -> None:
        """Add one reference to each cached block. Unknown handles raise ``KeyError`` before
        any count changes."""
        nodes = [self._node(h) for h in handles]
        for node in nodes:
            if node.refcount == 0:
                self._referenced += 1
            node.refcount += 1

    def release(self, handles: Iterable[int]) -> None:
        """Drop one reference from each cached block. A block reaching zero becomes evictable
        and counts as used now (recency, TTL). Raises before any change for an unknown handle
        or a release below zero."""
        nodes = [self._node(h) for h in handles]
        pending: dict[int, int] = {}
        for node in nodes:
            pending[id(node)] = pending.get(id(node), 0) + 1
            if pending[id(node)] > node.refcount:
                raise ValueError(
                    f"release of handle {node.handle} below zero references; release only what "
                    "you acquired"
                )
        tick, now = self._next_tick(), self.clock()
        freed = []
        for node in nodes:
            node.refcount -= 1
            if node.refcount == 0:
                self._referenced -= 1
                freed.append(node)
        self._touch(freed, tick, now)

    def evict(self, n: int) -> list[int]:
        """Remove up to ``n`` unreferenced leaf blocks, lowest priority first, continuing into
        parents that become leaves; returns their handles for the caller to reuse.
        Cost: O(log n) per evicted block (amortized)."""
        return [b.handle for b in self.evict_blocks(n)]

    def evict_blocks(self, n: int) -> list[CachedBlock]:
        """``evict``, returning each removed block's description (for a caller that keeps
        evicted blocks in a second tier), children before their parents."""
        out: list[CachedBlock] = []
        removed: list[_Node] = []
        while len(out) < n and self._evict_heap:
            prio, _, _, version, node = heapq.heappop(self._evict_heap)
            if not self._is_current(node, version):
                continue
            self._baseline = max(self._baseline, prio)
            self._remove(node)
            self._evicted += 1
            out.append(_describe(node))
            removed.append(node)
        self._note_removed(removed)
        return out

    def expire(self, now: float | None = None) -> list[int]:
        """Remove unreferenced leaf blocks idle for at least ``ttl`` seconds (continuing into
        parents that become expired leaves) and return their handles; ``[]`` without a TTL.
        Cost: O(log n) per expired block (amortized)."""
        if self.ttl is None:
            return []
        now = self.clock() if now is None else now
        out: list[int] = []
        removed: list[_Node] = []
        while self._ttl_heap and self._ttl_heap[0][0] + self.ttl <= now:
            _, _, _, version, node = heapq.heappop(self._ttl_heap)
            if not self._is_current(node, version):
                continue
            self._remove(node)
            self._expired += 1
            out.append(node.handle)
            removed.append(node)
        self._note_removed(removed)
        return out

    def clear(self, namespace: bytes | None = None) -> list[int]:
        """Remove every unreferenced block whose descendants are all unreferenced, in one
        namespace or in all; returns their handles. Cost: O(blocks in scope)."""
        roots = (
            list(self._roots.values()) if namespace is None else [self._roots.get(bytes(namespace))]
        )
        out: list[int] = []
        removed: list[_Node] = []
        for root in roots:
            if root is not None:
                self._clear_subtree(root, out, removed)
        self._cleared += len(out)
        if self._events is not None and removed:
            emptied = not self._roots if namespace is None else bytes(namespace) not in self._roots
            if emptied:  # one event instead of every hash
                self._events.append(Cleared(None if namespace is None else bytes(namespace)))
            else:
                self._note_removed(removed)
        return out

    def blocks(self, namespace: bytes | None = None) -> list[CachedBlock]:
        """Every cached block (of one namespace, or all), parents before their children. No
        side effects. Cost: O(blocks in scope)."""
        roots = (
            list(self._roots.values()) if namespace is None else [self._roots.get(bytes(namespace))]
        )
        out: list[CachedBlock] = []
        stack = [c for r in roots if r is not None for c in r.children.values()]
        while stack:
            node = stack.pop()
            out.append(_describe(node))
            stack.extend(node.children.values())
        return out

    def stats(self) -> IndexStats:
        """A snapshot of the counters. O(1)."""
        return IndexStats(
            queries=self._queries,
            queried_tokens=self._queried_tokens,
            hit_tokens=self._hit_tokens,
            cached_blocks=len(self._by_handle),
            referenced_blocks=self._referenced,
            inserted_blocks=self._inserted,
            evicted_blocks=self._evicted,
            expired_blocks=self._expired,
            cleared_blocks=self._cleared,
        )

    # ----------------------------------------------------------------------------- events

    def subscribe(self, subscriber: EventSubscriber | None) -> None:
        """Send this index's events to ``subscriber`` (None: stop sending; one subscriber at a
        time, a new one replaces the old).

        From now on every change is recorded as an event (``BlockStored``, ``BlockRemoved``,
        ``Cleared``) in a pending list, and ``flush_events`` hands the list to ``subscriber``
        in one call, in order: the owner decides the batching (an engine flushes once per
        step). The first batch starts with ``Cleared(None)`` and the blocks cached now, so
        a subscriber that replays its batches always agrees with the index (see
        ``PrefixTracker``). Cost: O(cached blocks) now, then O(1) per stored or removed block.
        """
        self._subscriber = subscriber
        if subscriber is None:
            self._events = None
            return
        self._events = [Cleared(None)]
        for ns, root in self._roots.items():
            stack = [root]
            while stack:  # one event per node with children: its children, as one-block chains
                node = stack.pop()
                parent = None if node.parent is None else node.hash
                for child in node.children.values():
                    self._events.append(BlockStored(ns, (child.hash,), parent))
                    stack.append(child)

    def flush_events(self) -> None:
        """Hand the pending events to the subscriber in one call (nothing when there are
        none or nobody subscribed). An exception from the subscriber propagates; the batch is
        not sent again."""
        events = self._events
        if not events or self._subscriber is None:
            return
        self._events = []
        self._subscriber(events)

    # ----------------------------------------------------------------------------- internals

    def _note_removed(self, nodes: list[_Node]) -> None:
        if self._events is None or not nodes:
            return
        by_ns: dict[bytes, list[bytes]] = {}
        for node in nodes:
            by_ns.setdefault(node.namespace, []).append(node.hash)
        for ns, hashes in by_ns.items():
            self._events.append(BlockRemoved(ns, tuple(hashes)))

    def _node(self, handle: int) -> _Node:
        try:
            return self._by_handle[handle]
        except KeyError:
            raise KeyError(
                f"handle {handle!r} caches no block (never inserted, or already evicted, "
                "expired or cleared)"
            ) from None

    def _seed(self, namespace: bytes) -> bytes:
        seed = self._seeds.get(namespace)
        if seed is None:
            seed = namespace_seed(namespace, self.hasher)
            if len(self._seeds) > 4096:  # a bounded memo: tenants come and go
                self._seeds.clear()
            self._seeds[bytes(namespace)] = seed
        return seed

    def _root(self, namespace: bytes, create: bool) -> _Node | None:
        if not isinstance(namespace, (bytes, bytearray)):
            raise TypeError(f"namespace must be bytes, got {type(namespace).__name__}")
        root = self._roots.get(bytes(namespace))
        if root is None and create:
            root = _Node(b"", b"", -1, None, bytes(namespace), next(self._seq))
            self._roots[bytes(namespace)] = root
        return root

    def _check_hashes(self, hashes: Sequence[bytes] | None, num_blocks: int) -> Sequence[bytes]:
        if hashes is None:
            return ()
        if len(hashes) > num_blocks:
            raise ValueError(
                f"got {len(hashes)} hashes for {num_blocks} full blocks; pass at most one hash "
                "per full block, in order"
            )
        return hashes

    def _walk(
        self, tokens: Tokens, namespace: bytes, hashes: Sequence[bytes] | None
    ) -> tuple[list[_Node], list[bytes]]:
        """The verified cached path of ``tokens`` and the hashes computed along it."""
        packed = pack_tokens(tokens)
        step = 4 * self.block_size
        num_blocks = len(packed) // step
        given = self._check_hashes(hashes, num_blocks)
        node = self._root(namespace, create=False)
        nodes: list[_Node] = []
        found: list[bytes] = []
        prev = b""
        hasher = self.hasher
        for i in range(num_blocks):
            if node is None:
                break
            block = packed[i * step : (i + 1) * step]
            if i < len(given):
                h = given[i]
            else:
                if i == 0:
                    prev = self._seed(namespace)
                h = hasher(prev + block)
            child = node.children.get(h)
            if child is None or child.block != block:  # a miss, or a collision
                break
            nodes.append(child)
            found.append(h)
            prev, node = h, child
        return nodes, found

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _is_candidate(self, node: _Node) -> bool:
        return node.alive and node.refcount == 0 and not node.children

    def _is_current(self, node: _Node, version: int) -> bool:
        return node.version == version and self._is_candidate(node)

    def _touch(self, nodes: list[_Node], tick: int, now: float) -> None:
        """Record an access and re-queue the evictable blocks under their new key.

        The key is fixed by what the touch records (hits, tick, baseline), so it is computed
        only when a block enters the heap: most touched blocks are inner or held ones."""
        baseline = self._baseline
        for node in nodes:
            node.last_access = tick
            node.last_used_time = now
            node.touch_baseline = baseline
            if not node.children and node.refcount == 0:
                self._push(node)

    def _push(self, node: _Node) -> None:
        node.version += 1
        priority = self.policy.priority(
            BlockAccess(node.hits, node.last_access), node.touch_baseline
        )
        heapq.heappush(self._evict_heap, (priority, node.last_access, node.seq, node.version, node))
        if self.ttl is not None:
            heapq.heappush(
                self._ttl_heap,
                (node.last_used_time, node.last_access, node.seq, node.version, node),
            )
        # Stale entries pile up as blocks are touched; rebuild once they dominate (amortized O(1)).
        if len(self._evict_heap) > 2 * len(self._by_handle) + 64:
            self._evict_heap = [e for e in self._evict_heap if self._is_current(e[4], e[3])]
            heapq.heapify(self._evict_heap)
            self._ttl_heap = [e for e in self._ttl_heap if self._is_current(e[4], e[3])]
            heapq.heapify(self._ttl_heap)

    def _remove(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None and not node.children and node.refcount == 0
        del parent.children[node.hash]
        del self._by_handle[node.handle]
        node.alive = False
        if parent.parent is None:  # a namespace root
            if not parent.children:
                self._roots.pop(parent.namespace, None)
        elif self._is_candidate(parent):
            self._push(parent)

    def _clear_subtree(self, node: _Node, out: list[int], removed: list[_Node]) -> bool:
        """Post-order removal; returns whether ``node``'s subtree is now empty of blocks."""
        empty = True
        for child in list(node.children.values()):
            empty = self._clear_subtree(child, out, removed) and empty
        if node.parent is None:
            if not node.children:
                self._roots.pop(node.namespace, None)
            return empty
        if empty and node.refcount == 0:
            parent = node.parent
            del parent.children[node.hash]
            del self._by_handle[node.handle]
            node.alive = False
            out.append(node.handle)
            removed.append(node)
            return True
        return False
