"""The cache routes: ``GET /v1/cache/stats``, ``POST /v1/cache/reset`` and
``POST /v1/cache/persist``."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from paged_engine import EngineStats

from .async_engine import EngineDeadError, EngineNotReadyError
from .protocol import APIError, parse_request
from .state import ServerState, get_state

__all__ = ["CacheResetRequest", "cache_router"]


class CacheResetRequest(BaseModel):
    """``POST /v1/cache/reset`` body (optional): the ``cache_salt`` whose namespace to reset."""

    cache_salt: str | None = Field(default=None)


async def _engine_call(state: ServerState, fn: Any) -> Any:
    state.check_available()
    try:
        return await state.engine.call(fn)
    except (EngineNotReadyError, EngineDeadError) as exc:
        raise APIError(503, str(exc), type="service_unavailable") from None


def cache_router() -> APIRouter:
    """``GET /v1/cache/stats``, ``POST /v1/cache/reset`` and ``POST /v1/cache/persist``.

    The stats are engine-wide (all tenants together), taken on the engine thread between two
    steps, for a server without API keys and for the admin key; any other key gets its own
    requests' counters (``tenant_usage``), never the engine's. The reset drops the unreferenced cached blocks of the caller's namespace: with API
    keys, ``xxh3_128(key) + cache_salt`` for the body's ``cache_salt`` (default empty), so a
    tenant resets one of its namespaces at a time and never another tenant's; without keys,
    the namespace of the given ``cache_salt``, or every namespace when none is given. Blocks
    held by running requests stay. The reset clears the disk tier's blocks of that scope too;
    the persist writes the in-memory cache of that scope to the disk tier and answers when it
    is written (400 when the server runs without ``--kv-disk-dir``).
    """
    router = APIRouter()

    @router.get("/v1/cache/stats")
    async def cache_stats(request: Request) -> Response:
        state = get_state(request)
        if not state.is_admin(request):  # another key sees its own counters, never the engine's
            state.check_available()
            assert state.usage is not None
            own = state.usage.of(state.tenant(request)).as_dict()
            return JSONResponse({"scope": "tenant", **own})
        stats: EngineStats = await _engine_call(state, lambda engine: engine.stats())
        block_size = state.engine.engine.config.block_size
        rate = {"prefix_cache_hit_rate": stats.prefix_cache_hit_rate, "block_size": block_size}
        return JSONResponse({**dataclasses.asdict(stats), **rate})

    async def scope_of(request: Request) -> tuple[ServerState, bytes | None, str]:
        state = get_state(request)
        raw = await request.body()
        body = parse_request(CacheResetRequest, raw) if raw.strip() else CacheResetRequest()
        if state.settings.api_keys:
            return state, state.cache_namespace(request, body.cache_salt or ""), "tenant"
        if body.cache_salt is not None:
            return state, body.cache_salt.encode("utf-8"), "namespace"
        return state, None, "all"

    @router.post("/v1/cache/reset")
    async def cache_reset(request: Request) -> Response:
        state, namespace, scope = await scope_of(request)
        freed: int = await _engine_call(state, lambda engine: engine.reset_prefix_cache(namespace))
        return JSONResponse({"object": "cache.reset", "scope": scope, "freed_blocks": freed})

    @router.post("/v1/cache/persist")
    async def cache_persist(request: Request) -> Response:
        state, namespace, scope = await scope_of(request)
        if state.engine.ready and state.engine.engine.disk_tier is None:
            raise APIError(400, "the disk tier is off: start the server with --kv-disk-dir")
        written: int = await _engine_call(
            state, lambda engine: engine.persist_prefix_cache(namespace)
        )
        return JSONResponse({"object": "cache.persist", "scope": scope, "written_blocks": written})

    return router
