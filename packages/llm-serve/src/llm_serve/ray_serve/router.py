"""The routing decision: which replica gets a prompt. Pure Python (no Ray), so it is unit-tested
on its own and reusable by any front end that knows its replicas' prefix-cache events.

Policy (SGLang's cache-aware router idea, fed by each replica's real prefix index):

1. Compute the prompt's chained block hashes under its namespace (the tenant's, exactly as the
   engine does) and ask, per replica, how many leading blocks it holds: the blocks its index
   reported (``PrefixTracker``), or blocks a request routed there is computing right now.
2. The replica with the longest match wins if that match covers at least
   ``prefix_match_threshold`` of the prompt's tokens and its load is within
   ``balance_abs_threshold`` requests (and ``balance_kv_threshold`` of KV usage) of the least
   loaded replica.
3. Otherwise the least loaded replica wins: fewest requests in flight, then lowest KV usage,
   then fewest blocks held or being computed (room for a new prefix), then name.

The events are hints: a replica verifies every token it reuses, so stale or lost events cost
hit rate, never correctness.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from prefix_index import IndexEvent, PrefixTracker

__all__ = ["STRATEGIES", "PrefixRouter", "ReplicaLoad", "RoutingPolicy"]

STRATEGIES = ("prefix", "round_robin", "least_loaded")


@dataclass(frozen=True)
class RoutingPolicy:
    """``prefix_match_threshold``: the fraction of a prompt a replica must hold for cache
    affinity to count (in [0, 1]; the engines' own setting). ``balance_abs_threshold``: how many
    more requests in flight than the least loaded replica a cache-affine replica may have.
    ``balance_kv_threshold``: the same bound on KV usage (a fraction of blocks).
    ``strategy``: ``"prefix"`` (the policy above), or a baseline to compare it with:
    ``"round_robin"`` (replicas in turn) or ``"least_loaded"`` (step 3 alone)."""

    prefix_match_threshold: float = 0.5
    balance_abs_threshold: int = 4
    balance_kv_threshold: float = 0.25
    strategy: str = "prefix"

    def __post_init__(self) -> None:
        if not 0.0 <= self.prefix_match_threshold <= 1.0:
            raise ValueError(
                f"prefix_match_threshold must be in [0, 1], got {self.prefix_match_threshold}"
            )
        if self.balance_abs_threshold < 0:
            raise ValueError(
                f"balance_abs_threshold must be >= 0 requests, got {self.balance_abs_threshold}"
            )
        if not 0.0 <= self.balance_kv_threshold <= 1.0:
            raise ValueError(
                f"balance_kv_threshold must be in [0, 1], got {self.balance_kv_threshold}"
            )
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclass
class ReplicaLoad:
    """What the router knows of one replica's load: requests it sent there that have not
    finished (running or waiting), and the KV usage the replica last reported."""

    in_flight: int = 0
    kv_usage: float = 0.0


@dataclass
class _Inflight:
    """Blocks being computed for requests routed to one replica (a counter per block key), so
    the next request of the same prefix follows before the replica's events arrive."""

    blocks: dict[bytes, Counter[bytes]] = field(default_factory=dict)

    def add(self, namespace: bytes, hashes: Sequence[bytes], k: int) -> None:
        counter = self.blocks.setdefault(namespace, Counter())
        for h in hashes:
            counter[h] += k
            if counter[h] <= 0:
                del counter[h]
        if not counter:
            del self.blocks[namespace]

    def num_blocks(self) -> int:
        return sum(len(c) for c in self.blocks.values())

    def match(self, namespace: bytes, hashes: Sequence[bytes]) -> int:
        counter = self.blocks.get(namespace)
        if not counter:
            return 0
        n = 0
        for h in hashes:
            if counter[h] <= 0:
                break
            n += 1
        return n


class PrefixRouter:
    """Chooses replicas by prefix-cache affinity and load (see the module docstring).

    Call ``add_replica`` / ``remove_replica`` as replicas come and go, ``apply`` with each
    replica's event batches, ``choose`` to route a prompt (it counts the request in flight and
    returns a token for ``finished``), and ``finished`` when it ends. ``settled(replica)``
    tells the router that every event the replica emitted before now has been applied (after a
    poll that started later than a request finished): only then does that request's in-flight
    hint go. Not thread-safe: use it from one event loop.
    """

    def __init__(self, block_size: int, policy: RoutingPolicy | None = None) -> None:
        self.block_size = block_size
        self.policy = policy or RoutingPolicy()
        self.tracker = PrefixTracker()
        self.loads: dict[Hashable, ReplicaLoad] = {}
        self._inflight: dict[Hashable, _Inflight] = {}
        self._settling: dict[Hashable, list[tuple[bytes, tuple[bytes, ...]]]] = {}
        self.routed: Counter[tuple[Hashable, str]] = Counter()  # (replica, "prefix"|"load")
        self._turn = 0  # round_robin's position

    def add_replica(self, replica: Hashable) -> None:
        """Start routing to ``replica`` with no cached blocks known (idempotent)."""
        self.loads.setdefault(replica, ReplicaLoad())
        self._inflight.setdefault(replica, _Inflight())

    def remove_replica(self, replica: Hashable) -> None:
        """Stop routing to ``replica`` and forget what it held (it died or restarted)."""
        self.loads.pop(replica, None)
        self._inflight.pop(replica, None)
        self._settling.pop(replica, None)
        self.tracker.drop(replica)

    def apply(self, replica: Hashable, events: Sequence[IndexEvent]) -> None:
        """Replay a batch of ``replica``'s prefix-index events."""
        if replica in self.loads:
            self.tracker.apply(replica, events)

    def choose(self, namespace: bytes, hashes: Sequence[bytes], num_tokens: int) -> Hashable:
        """The replica for a prompt of ``num_tokens`` tokens whose full blocks hash to
        ``hashes`` under ``namespace``; counts one request in flight there. Raises
        ``LookupError`` when no replica is available."""
        if not self.loads:
            raise LookupError("no engine replica is available")
        if self.policy.strategy == "round_robin":
            names = sorted(self.loads, key=str)
            self._turn += 1
            return self._count(names[self._turn % len(names)], namespace, hashes, "turn")
        least = min(self.loads, key=self._load_key)
        if self.policy.strategy == "least_loaded":
            return self._count(least, namespace, hashes, "load")
        best, best_blocks = least, 0
        for replica in self.loads:
            blocks = max(
                self.tracker.match(replica, namespace, hashes),
                self._inflight[replica].match(namespace, hashes),
            )
            better = blocks > best_blocks or (
                blocks == best_blocks and blocks and self._load_key(replica) < self._load_key(best)
            )
            if better:
                best, best_blocks = replica, blocks
        reason = "load"
        chosen = least
        if best_blocks and best_blocks * self.block_size >= (
            self.policy.prefix_match_threshold * num_tokens
        ):
            lb, ll = self.loads[best], self.loads[least]
            if (
                lb.in_flight - ll.in_flight <= self.policy.balance_abs_threshold
                and lb.kv_usage - ll.kv_usage <= self.policy.balance_kv_threshold
            ):
                chosen, reason = best, "prefix"
        return self._count(chosen, namespace, hashes, reason)

    def _count(
        self, chosen: Hashable, namespace: bytes, hashes: Sequence[bytes], reason: str
    ) -> Hashable:
        self.loads[chosen].in_flight += 1
        self._inflight[chosen].add(namespace, hashes, 1)
        self.routed[(chosen, reason)] += 1
        return chosen

    def finished(self, replica: Hashable, namespace: bytes, hashes: Sequence[bytes]) -> None:
        """A request ``choose`` sent to ``replica`` ended. Its in-flight hint stays until the
        replica's events up to now are applied (``settled``)."""
        load = self.loads.get(replica)
        if load is None:
            return
        load.in_flight = max(0, load.in_flight - 1)
        self._settling.setdefault(replica, []).append((namespace, tuple(hashes)))

    def settled(self, replica: Hashable, upto: int) -> None:
        """The first ``upto`` hints of ``replica`` that ``finished`` queued are now covered by
        applied events (pass ``pending(replica)`` taken before the poll began)."""
        queue = self._settling.get(replica)
        inflight = self._inflight.get(replica)
        if not queue or inflight is None:
            return
        for namespace, hashes in queue[:upto]:
            inflight.add(namespace, hashes, -1)
        del queue[:upto]

    def pending(self, replica: Hashable) -> int:
        """How many finished requests of ``replica`` wait for ``settled``."""
        return len(self._settling.get(replica, ()))

    def _load_key(self, replica: Hashable) -> tuple[int, float, int, str]:
        load = self.loads[replica]
        held = self.tracker.num_blocks(replica) + self._inflight[replica].num_blocks()
        return (load.in_flight, load.kv_usage, held, str(replica))
