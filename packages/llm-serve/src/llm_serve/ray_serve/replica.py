"""One engine replica as a Ray Serve deployment: an ``AsyncEngine`` plus its prefix-cache event
log, which the router reads by long polling.

Each replica is its own one-replica deployment (``engine-0``, ``engine-1``, ...), so the
router holds a handle to each and decides itself where a request goes. When a replica dies,
Ray Serve starts a new one under the same name; it carries a new ``uid``, which tells the
router to forget what the old one held.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray import serve

from paged_engine import EngineConfig, EngineStats, LLMEngine
from prefix_index import Cleared, IndexEvent

from ..async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineNotReadyError,
    EngineRequest,
    QueueFullError,
)

__all__ = ["ACCEPTED", "MAX_EVENT_LOG", "EngineReplica", "Rejected", "ReplicaInfo", "deployment"]

# Events kept for a router that polls late; past this the log restarts with Cleared(None) (the
# router then forgets this replica's blocks until new events arrive: hit rate, not correctness).
MAX_EVENT_LOG = 200_000

ACCEPTED = "accepted"


@dataclass(frozen=True)
class Rejected:
    """The first item of ``generate`` when the replica cannot take the requests."""

    status: int  # an HTTP status: 429 or 503
    message: str


class ReplicaInfo(dict[str, Any]):
    """What a replica tells the router once: ``uid``, ``pid``, ``tokenizer``, ``max_model_len``,
    ``max_seq_len``, ``num_blocks``, ``model_config``, ``config``."""


class EngineReplica:
    """The deployment class (wrapped by ``serve.deployment`` in ``deploy``). The model loads in
    the constructor, so Ray Serve reports the replica healthy only once it can serve."""

    def __init__(self, config: EngineConfig) -> None:
        self.uid = uuid.uuid4().hex
        engine = LLMEngine(config)
        self._llm = engine
        # The router enforces the queue limit across replicas (429 there); a replica takes what
        # it is sent.
        self._engine = AsyncEngine(lambda: engine, max_queue=1 << 30)
        self._lock = threading.Lock()
        self._log: list[IndexEvent] = []  # guarded by _lock
        self._log_start = 0  # absolute position of _log[0]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._start_lock: asyncio.Lock | None = None
        if config.enable_prefix_caching:
            engine.subscribe_cache_events(self._on_events)

    # -- engine thread --------------------------------------------------------------------------

    def _on_events(self, events: list[IndexEvent]) -> None:
        with self._lock:
            self._log.extend(events)
            if len(self._log) > MAX_EVENT_LOG:
                self._log_start += len(self._log)
                self._log = [Cleared(None)]
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody polls any more
                loop.call_soon_threadsafe(wake.set)

    # -- event loop -----------------------------------------------------------------------------

    async def _started(self) -> AsyncEngine:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
                self._wake = asyncio.Event()
                self._engine.start(self._loop)
                await asyncio.to_thread(self._engine.wait_ready, 60.0)
        return self._engine

    async def describe(self) -> ReplicaInfo:
        await self._started()
        llm = self._llm
        return ReplicaInfo(
            uid=self.uid,
            pid=os.getpid(),
            tokenizer=llm.tokenizer,
            max_model_len=llm.max_model_len,
            max_seq_len=llm.max_seq_len,
            num_blocks=llm.block_pool.num_blocks,
            model_config=llm.model_config,
            config=llm.config,
        )

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[Any]:
        """Stream ``ACCEPTED`` (or one ``Rejected``), then every ``RequestOutput`` of the
        group until all have finished. Cancelling the stream aborts the requests."""
        engine = await self._started()
        for r in requests:
            r.arrival_time = None  # arrival on this replica's clock
        try:
            stream = engine.add(requests)
        except QueueFullError as exc:
            yield Rejected(429, str(exc))
            return
        except (EngineNotReadyError, EngineDeadError) as exc:
            yield Rejected(503, str(exc))
            return
        yield ACCEPTED
        try:
            while not stream.finished:
                yield await stream.get()
        finally:
            stream.abort()

    async def poll(
        self, cursor: int, timeout: float
    ) -> tuple[str, int, list[IndexEvent], EngineStats | None]:
        """Events after position ``cursor`` (waiting up to ``timeout`` seconds for some), as
        ``(uid, next_cursor, events, stats)``. A cursor from before the log's start gets the
        log from its start, which then begins with ``Cleared(None)``. One reader at a time:
        events before ``cursor`` are dropped."""
        engine = await self._started()
        assert self._wake is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            self._wake.clear()
            with self._lock:
                if cursor > self._log_start:  # the reader has these: drop them
                    drop = min(cursor - self._log_start, len(self._log))
                    del self._log[:drop]
                    self._log_start += drop
                start = max(cursor, self._log_start)
                events = self._log[start - self._log_start :]
                end = self._log_start + len(self._log)
            remaining = deadline - asyncio.get_running_loop().time()
            if events or remaining <= 0:
                return self.uid, end, events, engine.stats()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """``fn(engine)`` on the engine thread between two steps (cache stats, resets)."""
        engine = await self._started()
        return await engine.call(fn)

    async def check_health(self) -> None:
        """Ray Serve's health check: a failed engine thread restarts the replica."""
        if self._engine.fatal_error is not None:
            raise RuntimeError(f"the engine failed: {self._engine.fatal_error}")

    def __del__(self) -> None:
        self._engine.stop(5.0)


def deployment(name: str, config: EngineConfig) -> Any:
    """The bound application of one engine replica named ``name``."""
    dep = serve.deployment(
        name=name,
        num_replicas=1,
        # Logical CPUs only schedule actors; zero lets N replicas share a small machine.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1 << 16,
        health_check_period_s=2.0,
        graceful_shutdown_timeout_s=30.0,
        # The router long-polls every replica: a log line per poll would drown the rest.
        logging_config={"enable_access_log": False},
    )(EngineReplica)
    return dep.bind(config)
