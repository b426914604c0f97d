"""The ingress side: an ``AsyncEngine`` look-alike whose requests run on engine replicas.

The HTTP app (routes, API keys, streaming, metrics, drain) is the single-process server's own;
only its engine is this one. ``add`` hashes each prompt's blocks under the request's namespace
(the tenant's, computed by the same route code as with one engine), asks the ``PrefixRouter``
for a replica and streams the outputs back from it. One poller per replica long-polls its
prefix-cache events and load figures into the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from paged_engine import EngineStats, LLMEngine, RequestOutput
from prefix_index import block_hashes

from ..async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineNotReadyError,
    EngineRequest,
    OutputStream,
    QueueFullError,
)
from .replica import ACCEPTED, Rejected, ReplicaInfo
from .router import PrefixRouter, RoutingPolicy

__all__ = ["Frontend", "ReplicaState", "RoutedEngine", "sum_stats"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Seconds a poll waits for events before it returns the replica's figures anyway.
POLL_TIMEOUT = 1.0
# Seconds before a replica that does not answer a poll counts as down.
POLL_GRACE = 10.0


@dataclasses.dataclass
class _PoolShape:
    num_blocks: int


@dataclasses.dataclass
class Frontend:
    """What the routes read from an engine (tokenizer, limits, config, prompt checks and chat
    template), without its weights or KV cache."""

    tokenizer: Any
    max_model_len: int
    max_seq_len: int
    model_config: Any
    config: Any
    block_pool: _PoolShape
    disk_tier: Any = None  # only "is it on" is asked here

    @classmethod
    def from_info(cls, info: ReplicaInfo) -> Frontend:
        config = info["config"]
        return cls(
            info["tokenizer"],
            info["max_model_len"],
            info["max_seq_len"],
            info["model_config"],
            config,
            _PoolShape(info["num_blocks"]),
            getattr(config, "kv_disk_dir", None),
        )

    # The engine's own checks and template, run on this object's fields: one implementation.
    def check_prompt(self, prompt: Any) -> list[int]:
        return LLMEngine.check_prompt(cast(LLMEngine, self), prompt)

    def chat_prompt(self, messages: Any, **kw: Any) -> list[int]:
        return LLMEngine.chat_prompt(cast(LLMEngine, self), messages, **kw)


@dataclasses.dataclass
class ReplicaState:
    """The ingress's view of one replica: its current incarnation and latest figures."""

    name: str
    handle: Any  # a ray.serve DeploymentHandle
    uid: str | None = None  # None while down or not yet reached
    pid: int | None = None
    stats: EngineStats | None = None
    cursor: int = 0


def sum_stats(stats: Sequence[EngineStats]) -> EngineStats:
    """Cluster-wide figures: every count summed, ``kv_usage`` recomputed from the sums."""
    fields = {
        f.name: sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(EngineStats)
    }
    total = fields["num_blocks_total"]
    fields["kv_usage"] = fields["num_blocks_used"] / total if total else 0.0
    return EngineStats(**fields)


@dataclasses.dataclass
class _Group:
    """Requests of one prompt sent to one replica (the n samples of a choice)."""

    replica: str
    namespace: bytes
    hashes: list[bytes]
    requests: list[EngineRequest]
    stream: OutputStream
    arrival: float
    unfinished: set[str]
    not_started: set[str]
    task: asyncio.Task[None] | None = None


class RoutedEngine(AsyncEngine):
    """Serves ``AsyncEngine``'s interface (what ``build_app`` and the routes use) over Ray Serve
    engine replicas, given as ``{name: DeploymentHandle}``.

    ``max_queue`` bounds the requests sent to replicas whose first output has not come back
    (cluster-wide; beyond it ``add`` raises ``QueueFullError``: 429). ``call(fn)`` runs ``fn``
    on every live replica and sums the results (numbers, or ``EngineStats``). A replica that
    fails mid-request ends its requests' streams with ``EngineDeadError`` (503); the router
    forgets it until Ray Serve has started it again.
    """

    def __init__(
        self,
        replicas: dict[str, Any],
        policy: RoutingPolicy | None = None,
        max_queue: int = 1024,
    ) -> None:
        super().__init__(_no_local_engine, max_queue=max_queue)
        if not replicas:
            raise ValueError("RoutedEngine needs at least one replica")
        self.replicas = {name: ReplicaState(name, h) for name, h in replicas.items()}
        self.policy = policy
        self.router: PrefixRouter | None = None
        self._frontend: Frontend | None = None
        self._groups: dict[str, _Group] = {}  # request id -> its group
        self._waiting = 0
        self._pollers: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        if self._loop is not None:
            raise RuntimeError("RoutedEngine.start() was already called")
        self._loop = loop
        self._on_failure = on_failure
        for rep in self.replicas.values():
            self._pollers.append(loop.create_task(self._poll_forever(rep)))

    @property
    def ready(self) -> bool:
        return (
            self._frontend is not None
            and not self._stopping
            and any(r.uid is not None for r in self.replicas.values())
        )

    @property
    def engine(self) -> LLMEngine:
        if self._frontend is None:
            raise EngineNotReadyError(self._not_ready_message())
        # The routes read only the tokenizer, limits and config, which Frontend carries.
        return cast(LLMEngine, self._frontend)

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stopping = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        done = threading.Event()

        def cancel() -> None:
            for task in self._pollers:
                task.cancel()
            for group in {id(g): g for g in self._groups.values()}.values():
                if group.task is not None:
                    group.task.cancel()
            done.set()

        if _in_loop(loop):
            cancel()
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(cancel)
            done.wait(timeout)

    # -- requests -------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return self._waiting

    @property
    def num_unfinished(self) -> int:
        return len(self._groups)

    def stats(self) -> EngineStats | None:
        live = [r.stats for r in self.replicas.values() if r.uid is not None and r.stats]
        return sum_stats(live) if live else None

    def add(
        self,
        requests: Sequence[EngineRequest],
        tenant: bytes = b"",
        tenant_limit: int | None = None,
    ) -> OutputStream:
        # The per-key waiting limit (``tenant_limit``) is not enforced across replicas yet.
        if not self.ready or self.router is None or self._loop is None:
            raise EngineNotReadyError(self._not_ready_message())
        if self._waiting + len(requests) > self.max_queue:
            raise QueueFullError(
                f"the server's waiting queue is full ({self._waiting} waiting, limit "
                f"{self.max_queue}); retry later"
            )
        stream = OutputStream(self, [r.request_id for r in requests])
        by_prompt: dict[tuple[bytes, tuple[int, ...]], list[EngineRequest]] = {}
        for r in requests:
            ns = bytes(r.cache_salt)
            by_prompt.setdefault((ns, tuple(r.prompt_token_ids)), []).append(r)
        now = time.monotonic()
        bs = self.router.block_size
        groups: list[_Group] = []
        for (ns, prompt), reqs in by_prompt.items():
            hashes = block_hashes(list(prompt), bs, ns)
            try:
                replica = str(self.router.choose(ns, hashes, len(prompt)))
            except LookupError as exc:
                for g in groups:
                    self.router.finished(g.replica, g.namespace, g.hashes)
                raise EngineDeadError(str(exc)) from None
            ids = {r.request_id for r in reqs}
            groups.append(_Group(replica, ns, hashes, reqs, stream, now, set(ids), set(ids)))
        for g in groups:
            for r in g.requests:
                self._groups[r.request_id] = g
            self._waiting += len(g.requests)
            g.task = self._loop.create_task(self._pump(g))
        return stream

    async def call(self, fn: Callable[[LLMEngine], _T]) -> _T:
        if not self.ready:
            raise EngineNotReadyError(self._not_ready_message())
        live = [r for r in self.replicas.values() if r.uid is not None]
        try:
            results = await asyncio.gather(*(r.handle.call.remote(fn) for r in live))
        except Exception as exc:
            raise EngineDeadError(f"an engine replica failed: {exc}") from None
        return cast(_T, _combine(results))

    async def per_replica(self, fn: Callable[[LLMEngine], _T]) -> list[tuple[ReplicaState, _T]]:
        """``fn(engine)`` on every live replica, with the replica it ran on."""
        live = [r for r in self.replicas.values() if r.uid is not None]
        results = await asyncio.gather(
            *(r.handle.call.remote(fn) for r in live), return_exceptions=True
        )
        return [
            (r, v) for r, v in zip(live, results, strict=True) if not isinstance(v, BaseException)
        ]

    def abort(self, request_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _in_loop(loop):
            self._cancel(request_id)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._cancel, request_id)

    def abort_all(self) -> None:
        for rid in list(self._groups):
            self.abort(rid)

    def _cancel(self, request_id: str) -> None:
        group = self._groups.get(request_id)
        if group is not None and group.task is not None:
            group.task.cancel()

    # -- one group's stream ---------------------------------------------------------------------

    async def _pump(self, g: _Group) -> None:
        rep = self.replicas[g.replica]
        failure: BaseException | None = None
        gen = None
        try:
            gen = rep.handle.options(stream=True).generate.remote(g.requests)
            async for item in gen:
                if item == ACCEPTED:
                    continue
                if isinstance(item, Rejected):  # the queue limit is ours: only 503 comes back
                    failure = EngineDeadError(item.message)
                    break
                self._deliver_one(g, item)
            if g.unfinished and failure is None:
                failure = EngineDeadError(
                    f"engine replica {g.replica} ended the request's stream early"
                )
        except asyncio.CancelledError:  # aborted here: the replica aborts its requests too
            if gen is not None:
                with contextlib.suppress(Exception):
                    gen.cancel()
            for rid in list(g.unfinished):
                prompt = next(r.prompt_token_ids for r in g.requests if r.request_id == rid)
                self._deliver_one(
                    g,
                    RequestOutput(
                        request_id=rid,
                        prompt_token_ids=list(prompt),
                        finished=True,
                        finish_reason="abort",
                        arrival_time=g.arrival,
                    ),
                    shift=False,
                )
        except Exception as exc:
            logger.warning("engine replica %s failed mid-request: %s", g.replica, exc)
            failure = EngineDeadError(f"engine replica {g.replica} failed: {type(exc).__name__}")
            self._replica_down(rep)
        finally:
            if self.router is not None:
                self.router.finished(g.replica, g.namespace, g.hashes)
            self._waiting -= len(g.not_started)
            g.not_started.clear()
            for r in g.requests:
                self._groups.pop(r.request_id, None)
        if failure is not None and g.unfinished:
            g.unfinished.clear()
            g.stream._put(failure)

    def _deliver_one(self, g: _Group, out: RequestOutput, shift: bool = True) -> None:
        if shift:  # the replica's clock to ours: arrival is when we queued the request
            offset = g.arrival - out.arrival_time
            out = dataclasses.replace(
                out,
                arrival_time=g.arrival,
                first_scheduled_time=_plus(out.first_scheduled_time, offset),
                first_token_time=_plus(out.first_token_time, offset),
                finish_time=_plus(out.finish_time, offset),
            )
        rid = out.request_id
        if rid in g.not_started:
            g.not_started.discard(rid)
            self._waiting -= 1
        if out.finished:
            g.unfinished.discard(rid)
            for hook in self.finish_hooks:
                try:
                    hook(out)
                except Exception:
                    logger.exception("a finish hook failed")
        g.stream._put(out)

    # -- replica pollers ------------------------------------------------------------------------

    async def _poll_forever(self, rep: ReplicaState) -> None:
        while not self._stopping:
            try:
                if rep.uid is None:
                    info: ReplicaInfo = await asyncio.wait_for(
                        rep.handle.describe.remote(), POLL_GRACE * 6
                    )
                    self._replica_up(rep, info)
                pending = self.router.pending(rep.name) if self.router else 0
                uid, cursor, events, stats = await asyncio.wait_for(
                    rep.handle.poll.remote(rep.cursor, POLL_TIMEOUT), POLL_TIMEOUT + POLL_GRACE
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if rep.uid is not None:
                    logger.warning("engine replica %s is unreachable: %s", rep.name, exc)
                self._replica_down(rep)
                await asyncio.sleep(0.5)
                continue
            if uid != rep.uid:  # restarted between describe and poll: start over
                self._replica_down(rep)
                continue
            rep.cursor, rep.stats = cursor, stats
            if self.router is not None:
                self.router.apply(rep.name, events)
                self.router.settled(rep.name, pending)
                load = self.router.loads.get(rep.name)
                if load is not None and stats is not None:
                    load.kv_usage = stats.kv_usage

    def _replica_up(self, rep: ReplicaState, info: ReplicaInfo) -> None:
        if self._frontend is None:
            self._frontend = Frontend.from_info(info)
            config = info["config"]
            policy = self.policy or RoutingPolicy(
                prefix_match_threshold=config.prefix_match_threshold
            )
            self.router = PrefixRouter(config.block_size, policy)
            self._ready.set()
        rep.uid, rep.pid, rep.cursor, rep.stats = info["uid"], info["pid"], 0, None
        assert self.router is not None
        self.router.remove_replica(rep.name)
        self.router.add_replica(rep.name)
        logger.info("engine replica %s is up (pid %s)", rep.name, rep.pid)

    def _replica_down(self, rep: ReplicaState) -> None:
        if rep.uid is None:
            return
        rep.uid, rep.stats = None, None
        if self.router is not None:
            self.router.remove_replica(rep.name)


def _no_local_engine() -> LLMEngine:
    raise RuntimeError("a RoutedEngine has no local engine")


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _plus(t: float | None, offset: float) -> float | None:
    return None if t is None else t + offset


def _combine(results: list[Any]) -> Any:
    if results and all(isinstance(r, EngineStats) for r in results):
        return sum_stats(results)
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in results):
        return sum(results)
    raise TypeError(
        "RoutedEngine.call combines numbers or EngineStats only; use per_replica for others"
    )
