"""The HTTP server: the FastAPI app factory and a uvicorn runner with graceful shutdown.

``build_app`` wires one engine into one app; everything the routes share lives in that app's
``ServerState`` (``app.state.llm``), so several apps can live in one process (tests do). Routers
are included one per concern (health, OpenAI API, metrics, cache); API keys and the body size
limit are an ASGI middleware (``tenancy.RequestGuard``) in front of all of them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from paged_engine import EngineConfig, LLMEngine

from .async_engine import AsyncEngine
from .cache_routes import CacheResetRequest, cache_router
from .connections import uvicorn_config
from .metrics import ServerMetrics, log_stats_forever, metrics_router
from .openai_api import openai_router
from .openapi import document_api
from .protocol import APIError
from .state import ServerSettings, ServerState, get_state, served_model_name
from .tenancy import RequestGuard
from .tenant_usage import TenantUsage
from .tokenize_routes import tokenize_router

__all__ = ["GracefulServer", "build_app", "health_router", "run_server"]

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def health_router() -> APIRouter:
    """``GET /health``: 200 once the model is loaded, 503 before, after a failure or while
    shutting down."""
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> Response:
        state = get_state(request)
        try:
            state.check_available()
        except APIError as err:
            return JSONResponse(err.body().model_dump(), status_code=503)
        return JSONResponse({"status": "ok"})

    return router


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status_code, headers=err.headers)


def build_app(
    engine: AsyncEngine | EngineConfig | LLMEngine,
    settings: ServerSettings | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine``.

    ``engine`` is an ``AsyncEngine`` (not yet started), an ``EngineConfig`` (the model loads in
    the engine thread when the app starts, so ``/health`` answers 503 meanwhile) or a built
    ``LLMEngine`` (which the app then owns). ``settings`` defaults to ``ServerSettings`` with the
    model name derived from the model spec. The engine thread starts with the app's lifespan and
    stops (aborting what is left) when the app shuts down; if the model fails to load, the
    state's ``failure_hooks`` run, and so they do if the engine later fails for good. The app has its own Prometheus registry
    (``app.state.llm.metrics``) and, with ``settings.log_interval`` > 0, logs the engine's
    figures every ``log_interval`` seconds while busy.
    """
    if isinstance(engine, AsyncEngine):
        async_engine = engine
        spec = None
    elif isinstance(engine, LLMEngine):
        built = engine
        spec = built.config.model
        async_engine = AsyncEngine(lambda: built)
    elif isinstance(engine, EngineConfig):
        config = engine
        spec = config.model
        async_engine = AsyncEngine(lambda: LLMEngine(config))
    else:
        raise TypeError(
            f"build_app needs an AsyncEngine, EngineConfig or LLMEngine, got {type(engine).__name__}"
        )
    if settings is None:
        if spec is None:
            raise ValueError("pass settings (with model_name) when giving an AsyncEngine")
        settings = ServerSettings(model_name=served_model_name(spec))
    async_engine.max_queue = settings.max_queue
    metrics = ServerMetrics(async_engine)
    async_engine.finish_hooks.append(metrics.observe)
    usage = TenantUsage()
    async_engine.tenant_hooks.append(usage.observe)
    state = ServerState(engine=async_engine, settings=settings, metrics=metrics, usage=usage)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        async_engine.start(state.loop, state.engine_failed)
        stats_task = (
            asyncio.ensure_future(log_stats_forever(async_engine, settings.log_interval))
            if settings.log_interval > 0
            else None
        )
        try:
            yield
        finally:
            state.draining = True
            if stats_task is not None:
                stats_task.cancel()
            await asyncio.to_thread(async_engine.stop, 30.0)

    app = FastAPI(title="llm-serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.llm = state

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        loc = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
        msg = errors[0]["msg"] if errors else "invalid request"
        return _error_response(APIError(400, f"{loc}: {msg}" if loc else msg, param=loc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(
            exc.status_code,
            str(exc.detail),
            type=_ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
        )
        return _error_response(err)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(
            APIError(500, f"internal server error: {exc}", type="internal_error")
        )

    app.include_router(health_router())
    app.include_router(openai_router())
    app.include_router(metrics_router())
    app.include_router(cache_router())
    app.include_router(tokenize_router())
    document_api(app, CacheResetRequest, settings.model_name)
    app.add_middleware(
        RequestGuard,
        api_keys=settings.api_keys,
        max_request_bytes=settings.max_request_bytes,
        body_timeout=settings.body_timeout,
    )
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server with the shutdown this project wants.

    On SIGINT / SIGTERM it stops accepting connections (uvicorn), tells the app to drain (new
    requests on open connections get 503; requests still running after ``shutdown_timeout`` are
    aborted and answered with an error), waits for connections to close, and returns normally
    instead of re-raising the signal, so the process exits with status 0. A second SIGINT
    forces an immediate exit.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
        self.app_state.begin_drain()


def run_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> int:
    """Serve ``app`` until SIGINT / SIGTERM; returns 0, or 1 if the model failed to load or the
    engine failed for good (the server then stops by itself, so a supervisor can restart it)."""
    state: ServerState = app.state.llm
    # uvicorn's own backstop; the app aborts late requests itself at shutdown_timeout.
    grace = state.settings.shutdown_timeout + 5.0
    settings = state.settings
    config = uvicorn_config(
        app,
        host,
        port,
        log_level,
        header_timeout=settings.header_timeout,
        max_connections=settings.max_connections,
        graceful_shutdown=int(grace) + 1,
    )
    server = GracefulServer(config, state)

    def stop_on_failure(exc: BaseException) -> None:
        server.should_exit = True
        state.begin_drain()

    state.failure_hooks.append(stop_on_failure)
    server.run()
    failed = state.engine.load_error is not None or state.engine.fatal_error is not None
    return 1 if failed else 0
