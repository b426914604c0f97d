"""What a ``PrefixIndex`` tells the outside world about its contents, and a router-side replica
of that knowledge.

An index with a subscriber records one event per change (blocks stored, blocks removed, a
namespace emptied) in a pending list and hands the list over in one call when its owner calls
``flush_events`` (an engine: once per step), so the hot path pays a list append, never a
callback per block. ``PrefixTracker`` replays those batches, one stream per replica, into
compact hash sets and answers "how many leading blocks of this chain does replica R hold".
Events are hints for routing: the engine that receives a request still verifies every token.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "BlockRemoved",
    "BlockStored",
    "Cleared",
    "EventSubscriber",
    "IndexEvent",
    "PrefixTracker",
]


@dataclass(frozen=True)
class BlockStored:
    """New blocks, a chain in order: ``hashes[0]`` is a child of ``parent_hash`` (None: the
    first block of a prompt), each next hash a child of the previous one."""

    namespace: bytes
    hashes: tuple[bytes, ...]
    parent_hash: bytes | None


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks no longer cached (evicted, expired or cleared)."""

    namespace: bytes
    hashes: tuple[bytes, ...]


@dataclass(frozen=True)
class Cleared:
    """Every block of ``namespace`` (None: of every namespace) is gone. Also the first event a
    new subscriber receives (``Cleared(None)``, then the index's current contents), so a
    subscriber never depends on what it saw before."""

    namespace: bytes | None


IndexEvent: TypeAlias = "BlockStored | BlockRemoved | Cleared"
EventSubscriber: TypeAlias = Callable[[list[IndexEvent]], None]


def _key(block_hash: bytes) -> int:
    # 8 bytes of a 128-bit digest as a small int: about half the memory of a bytes object
    # per block; a collision only misroutes (the engine verifies tokens).
    return int.from_bytes(block_hash[:8], "little")


class PrefixTracker:
    """Per replica, the set of chained block hashes its index holds, per namespace, kept up
    to date by that replica's event stream (``apply``).

    ``replica`` is any hashable name. Cost: ``apply`` is O(blocks in the events),
    ``match`` O(matched blocks), ``matches`` O(replicas x matched blocks). Not thread-safe.
    """

    def __init__(self) -> None:
        self._blocks: dict[Hashable, dict[bytes, set[int]]] = {}

    def apply(self, replica: Hashable, events: Iterable[IndexEvent]) -> None:
        """Replay a batch of ``replica``'s events, in order."""
        spaces = self._blocks.setdefault(replica, {})
        for ev in events:
            if isinstance(ev, BlockStored):
                blocks = spaces.get(ev.namespace)
                if blocks is None:
                    blocks = spaces[bytes(ev.namespace)] = set()
                blocks.update(_key(h) for h in ev.hashes)
            elif isinstance(ev, BlockRemoved):
                blocks = spaces.get(ev.namespace)
                if blocks is not None:
                    blocks.difference_update(_key(h) for h in ev.hashes)
                    if not blocks:
                        del spaces[ev.namespace]
            elif isinstance(ev, Cleared):
                if ev.namespace is None:
                    spaces.clear()
                else:
                    spaces.pop(ev.namespace, None)
            else:
                raise TypeError(f"not an index event: {type(ev).__name__}")

    def drop(self, replica: Hashable) -> None:
        """Forget ``replica`` (it died, or its stream broke); unknown replicas are ignored."""
        self._blocks.pop(replica, None)

    @property
    def replicas(self) -> list[Hashable]:
        """Replicas that have sent events since they were last dropped."""
        return list(self._blocks)

    def num_blocks(self, replica: Hashable) -> int:
        """Blocks ``replica`` holds, over all namespaces."""
        return sum(len(b) for b in self._blocks.get(replica, {}).values())

    def match(self, replica: Hashable, namespace: bytes, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the chain ``hashes`` (as ``block_hashes`` computes them
        under ``namespace``) ``replica`` holds."""
        blocks = self._blocks.get(replica, {}).get(namespace)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if _key(h) not in blocks:
                break
            n += 1
        return n

    def matches(self, namespace: bytes, hashes: Sequence[bytes]) -> dict[Hashable, int]:
        """``match`` for every known replica."""
        return {r: self.match(r, namespace, hashes) for r in self._blocks}
