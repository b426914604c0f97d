"""The multi-replica app: the single-process server's app over a ``RoutedEngine``, plus what
only several replicas have (a ``replicas`` list in ``/v1/cache/stats``, per-replica metrics)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from paged_engine import EngineStats, LLMEngine

from ..async_engine import EngineDeadError, EngineNotReadyError
from ..metrics import METRIC_PREFIX
from ..protocol import APIError
from ..server import build_app
from ..state import ServerSettings, get_state
from .routed_engine import RoutedEngine, sum_stats

__all__ = ["build_routed_app"]


def build_routed_app(engine: RoutedEngine, settings: ServerSettings) -> FastAPI:
    """``build_app(engine, settings)`` with ``GET /v1/cache/stats`` answering the cluster-wide
    sums plus ``replicas`` (one object per live replica: ``replica``, ``pid`` and its own
    figures) and ``/metrics`` carrying per-replica families labelled ``replica``."""
    app = build_app(engine, settings)
    app.include_router(_cache_stats_router(engine))
    # First match wins: put it before the single-engine stats route of the same path.
    app.router.routes.insert(0, app.router.routes.pop())
    state = app.state.llm
    assert state.metrics is not None
    state.metrics.registry.register(_ReplicaCollector(engine))
    return app


def _stats(e: LLMEngine) -> EngineStats:
    return e.stats()


def cache_stats_dict(stats: EngineStats) -> dict[str, Any]:
    """``/v1/cache/stats``'s figures: every ``EngineStats`` field and the hit rate."""
    return {**dataclasses.asdict(stats), "prefix_cache_hit_rate": stats.prefix_cache_hit_rate}


def _cache_stats_router(engine: RoutedEngine) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/cache/stats")
    async def cache_stats(request: Request) -> Response:
        state = get_state(request)
        state.check_available()
        try:
            per = await engine.per_replica(_stats)
        except (EngineNotReadyError, EngineDeadError) as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        if not per:
            raise APIError(503, "no engine replica answered", type="service_unavailable")
        block_size = engine.engine.config.block_size
        body = {**cache_stats_dict(sum_stats([s for _, s in per])), "block_size": block_size}
        body["replicas"] = [
            {"replica": rep.name, "pid": rep.pid, **cache_stats_dict(s)} for rep, s in per
        ]
        return JSONResponse(body)

    return router


class _ReplicaCollector(Collector):
    """Per-replica figures (label ``replica``) from each replica's latest polled stats, and the
    router's decisions."""

    def __init__(self, engine: RoutedEngine) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return []  # collected on demand: families depend on the replicas

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            METRIC_PREFIX + "replica_up",
            "1 while the router can reach the engine replica.",
            labels=["replica"],
        )
        gauges = {
            "num_requests_running": ("Requests running in the replica's engine.", "num_running"),
            "num_requests_waiting": ("Requests waiting in the replica's scheduler.", "num_waiting"),
            "kv_cache_usage_perc": ("Fraction of the replica's KV blocks in use.", "kv_usage"),
            "prefix_cache_hit_rate": (
                "The replica's prefix-cache hit rate since it started.",
                "prefix_cache_hit_rate",
            ),
        }
        families = {
            k: GaugeMetricFamily(METRIC_PREFIX + "replica_" + k, doc, labels=["replica"])
            for k, (doc, _) in gauges.items()
        }
        counters = {
            "prefix_cache_hits_total": "prefix_cache_hit_tokens",
            "prefix_cache_queries_total": "prefix_cache_queried_tokens",
            "num_finished_total": "num_finished",
        }
        counter_families = {
            k: CounterMetricFamily(
                METRIC_PREFIX + "replica_" + k,
                f"The replica's {k.removesuffix('_total').replace('_', ' ')} (since it started).",
                labels=["replica"],
            )
            for k in counters
        }
        for rep in self._engine.replicas.values():
            up.add_metric([rep.name], 1.0 if rep.uid is not None else 0.0)
            s = rep.stats
            if s is None or rep.uid is None:
                continue
            for k, (_, attr) in gauges.items():
                families[k].add_metric([rep.name], float(getattr(s, attr)))
            for k, attr in counters.items():
                counter_families[k].add_metric([rep.name], float(getattr(s, attr)))
        routed = CounterMetricFamily(
            METRIC_PREFIX + "router_requests",
            "Prompts routed, by replica and reason: 'prefix' (cache affinity) or 'load'.",
            labels=["replica", "reason"],
        )
        router = self._engine.router
        if router is not None:
            for (name, reason), n in sorted(router.routed.items(), key=str):
                routed.add_metric([str(name), reason], n)
        yield up
        yield from families.values()
        yield from counter_families.values()
        yield routed
