"""The engine in its own thread, fed and drained from an asyncio event loop.

``LLMEngine`` is not thread-safe and its ``step`` blocks for a whole forward pass, so one
background thread owns it: it loads the model, then loops ``step`` while work exists and sleeps
on a condition variable otherwise. The event loop only ever enqueues commands (add, abort) under
a lock and receives outputs through ``loop.call_soon_threadsafe``; it never waits on the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from paged_engine import EngineStats, LLMEngine, RequestOutput, SamplingParams

__all__ = [
    "AsyncEngine",
    "EngineDeadError",
    "EngineNotReadyError",
    "EngineRequest",
    "OutputStream",
    "QueueFullError",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class EngineNotReadyError(RuntimeError):
    """The model is still loading, failed to load, or the engine was stopped."""


class EngineDeadError(RuntimeError):
    """The engine thread failed; no request can make progress."""


class QueueFullError(RuntimeError):
    """Accepting the request would grow the waiting queue past its limit."""


@dataclass
class EngineRequest:
    """One engine request: what ``LLMEngine.add_request`` takes (``arrival_time``:
    ``time.monotonic()``, set by ``AsyncEngine.add`` when None)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: bytes = b""
    arrival_time: float | None = None


class OutputStream:
    """Outputs of a group of engine requests (the choices of one API call), in arrival order.

    Created by ``AsyncEngine.add``; consumed in the event loop. Each ``RequestOutput`` is a
    cumulative snapshot; iteration ends once every request of the group has finished. If the
    engine thread dies, iteration raises ``EngineDeadError``.
    """

    def __init__(
        self, engine: AsyncEngine, request_ids: Sequence[str], tenant: bytes = b""
    ) -> None:
        self._engine = engine
        self.tenant = tenant
        self.request_ids: list[str] = list(request_ids)
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._unfinished: set[str] = set(request_ids)

    @property
    def finished(self) -> bool:
        """True once every request of the group has reported its final output."""
        return not self._unfinished

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        """The next output of any request in the group (waits for it)."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    def abort(self) -> None:
        """Abort every unfinished request of the group (idempotent; thread-safe)."""
        for rid in self._unfinished:
            self._engine.abort(rid)


class AsyncEngine:
    """Runs an ``LLMEngine`` in a dedicated thread for an asyncio server.

    ``start(loop)`` launches the thread, which builds the engine with ``factory`` (loading the
    model) and then serves commands. ``add`` and ``abort`` may be called from the event loop at
    any time; ``add`` raises ``EngineNotReadyError`` before the model is loaded and
    ``QueueFullError`` when the requests not yet running (queued here or waiting in the
    scheduler) would exceed ``max_queue``, or a tenant's waiting requests its own limit.
    ``stop`` aborts everything and joins the thread.
    """

    def __init__(self, factory: Callable[[], LLMEngine], max_queue: int = 1024) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._factory = factory
        self.max_queue = max_queue
        self._cond = threading.Condition()
        # Guarded by _cond:
        self._inbox: list[EngineRequest] = []
        self._calls: list[tuple[Callable[[LLMEngine], Any], asyncio.Future[Any]]] = []
        self._aborts: list[str] = []
        self._abort_all = False
        self._stopping = False
        self._engine_waiting = 0
        self._stats: EngineStats | None = None
        # Set once by the engine thread, read anywhere:
        self._engine: LLMEngine | None = None
        self._ready = threading.Event()
        self.load_error: BaseException | None = None
        self.fatal_error: BaseException | None = None
        # Event-loop side only:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, OutputStream] = {}
        # Requests with no output yet (not started, as far as the loop can tell), by tenant.
        self._unstarted: dict[str, bytes] = {}
        self._tenant_waiting: dict[bytes, int] = {}
        self._thread: threading.Thread | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        # Called in the event loop with every request's final output (e.g. for metrics).
        self.finish_hooks: list[Callable[[RequestOutput], None]] = []
        # The same, with the tenant given to ``add`` (e.g. for per-tenant usage).
        self.tenant_hooks: list[Callable[[bytes, RequestOutput], None]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """Start the engine thread; outputs are delivered on ``loop``. ``on_failure`` is called
        (in the loop) with the exception if building the engine fails (``load_error``) or the
        engine stops for good (``fatal_error``): a server then exits so a supervisor restarts
        it."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was already called")
        self._loop = loop
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, name="llm-serve-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """True once the model is loaded and the engine thread is alive and healthy."""
        return self._ready.is_set() and self.fatal_error is None and not self._stopping

    @property
    def engine(self) -> LLMEngine:
        """The engine, for read-only attributes (tokenizer, max_model_len, model_config).

        Never call its methods from another thread. Raises ``EngineNotReadyError`` before load.
        """
        if self._engine is None:
            raise EngineNotReadyError(self._not_ready_message())
        return self._engine

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block (a thread, not the event loop) until the model is loaded or failed."""
        self._ready.wait(timeout)
        return self._ready.is_set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort every request, stop the thread and wait for it (thread-safe, idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- requests -------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests accepted but not yet running: queued here plus waiting in the scheduler."""
        with self._cond:
            return len(self._inbox) + self._engine_waiting

    @property
    def num_unfinished(self) -> int:
        """Requests accepted whose final output has not been delivered yet (event loop only)."""
        return len(self._streams)

    def stats(self) -> EngineStats | None:
        """The engine's statistics after its latest step (None before the model is loaded)."""
        with self._cond:
            return None if self._stats is None else dataclasses.replace(self._stats)

    def tenant_waiting(self, tenant: bytes) -> int:
        """Requests of ``tenant`` accepted that have produced no output yet (event loop only)."""
        return self._tenant_waiting.get(tenant, 0)

    def add(
        self,
        requests: Sequence[EngineRequest],
        tenant: bytes = b"",
        tenant_limit: int | None = None,
    ) -> OutputStream:
        """Queue a group of requests atomically and return the stream of their outputs.

        Call from the event loop given to ``start``. Raises ``EngineNotReadyError``,
        ``EngineDeadError`` or ``QueueFullError`` without queueing anything; the last also when
        ``tenant_limit`` is given and ``tenant``'s requests without output yet would exceed it
        (a tenant is any bytes, e.g. the API key's tenant id). A request's ``arrival_time`` is
        now unless given, so time spent queued here counts towards its queue time and time to
        first token.
        """
        self._check_serving()
        stream = OutputStream(self, [r.request_id for r in requests], tenant)
        mine = self._tenant_waiting.get(tenant, 0)
        if tenant_limit is not None and mine + len(requests) > tenant_limit:
            raise QueueFullError(
                f"this API key already has {mine} request(s) waiting (limit {tenant_limit} per "
                f"key); retry later"
            )
        with self._cond:
            waiting = len(self._inbox) + self._engine_waiting
            if waiting + len(requests) > self.max_queue:
                raise QueueFullError(
                    f"the server's waiting queue is full ({waiting} waiting, limit "
                    f"{self.max_queue}); retry later"
                )
            now = time.monotonic()
            for r in requests:
                if r.arrival_time is None:
                    r.arrival_time = now
                self._streams[r.request_id] = stream
                self._unstarted[r.request_id] = tenant
            self._inbox.extend(requests)
            self._cond.notify_all()
        self._tenant_waiting[tenant] = mine + len(requests)
        return stream

    async def call(self, fn: Callable[[LLMEngine], _T]) -> _T:
        """Run ``fn(engine)`` on the engine thread between two steps and return its result (or
        raise its exception) without blocking the event loop; for operations such as cache
        statistics or resets. Raises ``EngineNotReadyError`` / ``EngineDeadError`` like ``add``.
        """
        self._check_serving()
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify_all()
        return await future

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe; unknown or finished ids are ignored)."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify_all()

    def abort_all(self) -> None:
        """Abort every request in flight (thread-safe); each stream gets an ``abort`` output."""
        with self._cond:
            self._abort_all = True
            self._cond.notify_all()

    def _check_serving(self) -> None:
        if self.fatal_error is not None:
            raise EngineDeadError(f"the engine failed: {self.fatal_error}")
        if not self._ready.is_set() or self._stopping or self._engine is None:
            raise EngineNotReadyError(self._not_ready_message())

    def _not_ready_message(self) -> str:
        if self.load_error is not None:
            return f"the model failed to load: {self.load_error}"
        if self._stopping:
            return "the server is shutting down"
        return "the model is still loading; retry when /health answers 200"

    # -- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._factory()
        except BaseException as exc:
            logger.exception("loading the model failed")
            self.load_error = exc
            self._ready.set()
            if self._on_failure is not None:
                self._call_in_loop(self._on_failure, exc)
            return
        self._engine = engine
        with self._cond:
            self._stats = engine.stats()
        self._ready.set()
        logger.info("model loaded; max_model_len=%d", engine.max_model_len)
        try:
            self._serve(engine)
        except BaseException as exc:
            logger.exception("the engine failed")
            self.fatal_error = exc
            self._call_in_loop(self._fail_all, EngineDeadError(f"the engine failed: {exc}"))
            if self._on_failure is not None:
                self._call_in_loop(self._on_failure, exc)
            return
        try:
            engine.close()  # graceful: the prefix cache goes to the disk tier, when there is one
        except Exception:
            logger.exception("closing the engine failed")

    def _serve(self, engine: LLMEngine) -> None:
        live: set[str] = set()  # ids added to the engine and not yet reported finished
        while True:
            with self._cond:
                while not (
                    self._inbox
                    or self._calls
                    or self._aborts
                    or self._abort_all
                    or self._stopping
                    or engine.has_unfinished()
                ):
                    self._cond.wait()
                adds, self._inbox = self._inbox, []
                calls, self._calls = self._calls, []
                aborts, self._aborts = self._aborts, []
                abort_all, self._abort_all = self._abort_all, False
                stopping = self._stopping
            for fn, future in calls:
                try:
                    result = fn(engine)
                except Exception as exc:
                    self._call_in_loop(_settle, future, None, exc)
                else:
                    self._call_in_loop(_settle, future, result, None)
            outputs: list[RequestOutput] = []
            for req in adds:
                try:
                    engine.add_request(
                        req.request_id,
                        req.prompt_token_ids,
                        req.params,
                        req.arrival_time,
                        req.cache_salt,
                    )
                    live.add(req.request_id)
                except Exception as exc:  # a duplicate request id
                    outputs.append(
                        RequestOutput(
                            request_id=req.request_id,
                            prompt_token_ids=list(req.prompt_token_ids),
                            finished=True,
                            finish_reason="error",
                            error=str(exc),
                        )
                    )
            if abort_all or stopping:
                aborts = list(live)
            for rid in aborts:
                engine.abort(rid)
            if engine.has_unfinished():
                outputs.extend(engine.step())
            for out in outputs:
                if out.finished:
                    live.discard(out.request_id)
            stats = engine.stats()
            with self._cond:
                self._stats = stats
                self._engine_waiting = stats.num_waiting
            if outputs:
                self._call_in_loop(self._deliver, outputs)
            if stopping and not engine.has_unfinished():
                return

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            loop.call_soon_threadsafe(fn, *args)

    # -- event-loop side ------------------------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._started(out.request_id)
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
                for hook in self.finish_hooks:
                    try:
                        hook(out)
                    except Exception:
                        logger.exception("a finish hook failed")
                for tenant_hook in self.tenant_hooks:
                    try:
                        tenant_hook(stream.tenant, out)
                    except Exception:
                        logger.exception("a finish hook failed")
            stream._put(out)

    def _started(self, request_id: str) -> None:
        tenant = self._unstarted.pop(request_id, None)
        if tenant is None:
            return
        left = self._tenant_waiting[tenant] - 1
        if left:
            self._tenant_waiting[tenant] = left
        else:
            del self._tenant_waiting[tenant]

    def _fail_all(self, exc: BaseException) -> None:
        streams = set(self._streams.values())
        self._streams.clear()
        self._unstarted.clear()
        self._tenant_waiting.clear()
        for stream in streams:
            stream._put(exc)
        with self._cond:
            calls, self._calls = self._calls, []
        for _fn, future in calls:
            _settle(future, None, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller gave up (cancelled)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
