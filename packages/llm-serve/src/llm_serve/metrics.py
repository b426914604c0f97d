"""Prometheus metrics and the periodic statistics log line.

Every app has its own ``CollectorRegistry`` (nothing touches prometheus_client's global one),
so several servers can live in one process. Engine-wide figures come from the ``EngineStats``
snapshot the engine thread takes after each of its iterations (``AsyncEngine.stats()``): the
event loop never calls into the engine while it steps. Counters follow the engine's own
totals (prefix-cache tokens are counted once per request, at its first admission). Latency
histograms are observed in the event loop when a request finishes normally (``stop`` /
``length``); aborted and failed requests are not observed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from paged_engine import EngineStats, RequestOutput

from .async_engine import AsyncEngine
from .protocol import APIError
from .state import get_state

__all__ = [
    "METRIC_PREFIX",
    "ServerMetrics",
    "StatsLogger",
    "log_stats_forever",
    "metrics_router",
]

logger = logging.getLogger(__name__)

METRIC_PREFIX = "llm_serve:"

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
_TPOT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_LATENCY_BUCKETS = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_QUEUE_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip


def _name(short: str) -> str:
    return METRIC_PREFIX + short


class _EngineCollector(Collector):
    """Engine gauges and counters from the engine thread's latest ``EngineStats`` snapshot.
    Yields nothing until the model is loaded."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return list(self._families(None, 0))

    def collect(self) -> Iterable[Metric]:
        stats = self._engine.stats()
        if stats is None:
            return []
        return list(self._families(stats, self._engine.num_waiting))

    @staticmethod
    def _families(stats: EngineStats | None, waiting: int) -> Iterator[Metric]:
        for counter, short, field, doc in _ENGINE_METRICS:
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(_name(short), doc)
            if stats is not None:
                family.add_metric([], waiting if field == "waiting" else getattr(stats, field))
            yield family
        blocks = GaugeMetricFamily(
            _name("kv_cache_blocks"),
            "KV blocks by state: free, cached (reusable, held only by the prefix cache) or "
            "used (held by requests).",
            labels=["state"],
        )
        if stats is not None:
            blocks.add_metric(["free"], stats.num_blocks_free)
            blocks.add_metric(["cached"], stats.num_blocks_cached)
            blocks.add_metric(["used"], stats.num_blocks_used)
        yield blocks


# (counter or gauge, name, EngineStats field or "waiting", help)
_ENGINE_METRICS: tuple[tuple[bool, str, str, str], ...] = (
    (True, "prefix_cache_queries_total", "prefix_cache_queried_tokens",
     "Prompt tokens looked up in the prefix cache (once per request, at first admission)."),
    (True, "prefix_cache_hits_total", "prefix_cache_hit_tokens",
     "Prompt tokens found in the prefix cache (once per request, at first admission)."),
    (False, "prefix_cache_hit_rate", "prefix_cache_hit_rate",
     "prefix_cache_hits_total / prefix_cache_queries_total since the server started."),
    (False, "kv_cache_usage_perc", "kv_usage",
     "Fraction (0 to 1) of KV blocks held by running requests (cached blocks excluded)."),
    (True, "cache_evictions_total", "num_evictions", "Cached blocks evicted to make room."),
    (True, "cache_expirations_total", "num_expirations", "Cached blocks dropped by the cache TTL."),
    (True, "disk_hit_tokens_total", "disk_hit_tokens",
     "Prompt tokens loaded from the disk tier (also counted in prefix_cache_hits_total)."),
    (True, "disk_spills_total", "disk_spills",
     "KV blocks written to the disk tier (evicted, persisted or at shutdown)."),
    (True, "disk_spill_drops_total", "disk_spill_drops",
     "KV blocks not written to the disk tier because its writer's queue was full."),
    (True, "disk_load_seconds_total", "disk_load_seconds",
     "Seconds spent loading KV blocks from the disk tier at admission."),
    (False, "kv_disk_blocks", "disk_blocks", "KV blocks stored in the disk tier."),
    (False, "kv_disk_bytes", "disk_bytes", "Bytes of the disk tier's block files."),
    (True, "num_preemptions_total", "num_preemptions",
     "Running requests preempted for lack of KV blocks (recomputed later)."),
    (False, "num_requests_running", "num_running", "Requests running in the engine."),
    (False, "num_requests_waiting", "waiting",
     "Requests accepted and not yet running (queued for the engine or its scheduler)."),
    (True, "prompt_tokens_total", "prompt_tokens_total",
     "Prompt tokens of requests added to the engine."),
    (True, "generation_tokens_total", "generation_tokens_total", "Tokens generated."),
)  # fmt: skip


class ServerMetrics:
    """One server's Prometheus registry: the engine collector and four latency histograms.

    ``observe(output)`` records a finished request (call it in the event loop, e.g. as an
    ``AsyncEngine.finish_hooks`` entry):

    - ``time_to_first_token_seconds``: first token time - arrival;
    - ``time_per_output_token_seconds``: (finish - first token) / (tokens - 1), requests with
      at least two tokens;
    - ``e2e_request_latency_seconds``: finish - arrival;
    - ``request_queue_time_seconds``: first scheduling (``first_scheduled_time``) - arrival.

    Arrival is when the server queued the request for the engine.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram(
            _name("time_to_first_token_seconds"),
            "Seconds from arrival to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            _name("time_per_output_token_seconds"),
            "Mean seconds per generated token after the first, per request.",
            buckets=_TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            _name("e2e_request_latency_seconds"),
            "Seconds from arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            _name("request_queue_time_seconds"),
            "Seconds from arrival until the engine first scheduled the request.",
            buckets=_QUEUE_BUCKETS,
            registry=self.registry,
        )

    def observe(self, out: RequestOutput) -> None:
        """Record one finished request (only ``stop`` / ``length`` finishes count)."""
        if out.finish_reason not in ("stop", "length"):
            return
        arrival = out.arrival_time
        if out.first_scheduled_time is not None:
            self.queue.observe(max(0.0, out.first_scheduled_time - arrival))
        if out.first_token_time is not None:
            self.ttft.observe(max(0.0, out.first_token_time - arrival))
            if out.finish_time is not None and len(out.token_ids) > 1:
                per_token = (out.finish_time - out.first_token_time) / (len(out.token_ids) - 1)
                self.tpot.observe(max(0.0, per_token))
        if out.finish_time is not None:
            self.e2e.observe(max(0.0, out.finish_time - arrival))

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def metrics_router() -> APIRouter:
    """``GET /metrics``: the app's registry in Prometheus text format."""
    router = APIRouter()

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = get_state(request)
        state.check_admin(request, "/metrics")
        if state.metrics is None:
            raise APIError(404, "metrics are not enabled on this server", type="not_found_error")
        return Response(content=state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router


# -- the periodic log line --------------------------------------------------------------------------


@dataclasses.dataclass
class StatsLogger:
    """Turns successive ``EngineStats`` snapshots into one log line per interval while busy.

    ``line(now, stats, waiting)`` returns the line for the interval since the previous call
    (None when the engine was idle throughout: nothing running or waiting and no tokens
    processed), and remembers ``stats`` for the next one.
    """

    _last: EngineStats | None = None
    _last_time: float = 0.0

    def line(self, now: float, stats: EngineStats, waiting: int) -> str | None:
        last, last_time = self._last, self._last_time
        self._last, self._last_time = stats, now
        if last is None:
            return None
        elapsed = max(now - last_time, 1e-9)
        prompt = stats.prompt_tokens_total - last.prompt_tokens_total
        generated = stats.generation_tokens_total - last.generation_tokens_total
        if not (prompt or generated or stats.num_running or waiting):
            return None
        queried = stats.prefix_cache_queried_tokens - last.prefix_cache_queried_tokens
        hits = stats.prefix_cache_hit_tokens - last.prefix_cache_hit_tokens
        interval_rate = f"{100.0 * hits / queried:.1f}%" if queried else "n/a"
        return (
            f"prompt throughput {prompt / elapsed:.1f} tok/s, generation throughput "
            f"{generated / elapsed:.1f} tok/s; running {stats.num_running}, waiting {waiting}; "
            f"KV cache usage {100.0 * stats.kv_usage:.1f}%; prefix cache hit rate "
            f"{interval_rate} (since start {100.0 * stats.prefix_cache_hit_rate:.1f}%)"
        )


async def log_stats_forever(engine: AsyncEngine, interval: float) -> None:
    """Every ``interval`` seconds, log the engine's figures at INFO while it is busy (runs until
    cancelled)."""
    stats_logger = StatsLogger()
    while True:
        await asyncio.sleep(interval)
        stats = engine.stats()
        if stats is None:
            continue
        text = stats_logger.line(time.monotonic(), stats, engine.num_waiting)
        if text is not None:
            logger.info("%s", text)
