"""Per-server settings and state: everything a route needs, held by the app, never global."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from paged_engine.model_loader import is_hub_id

from .async_engine import AsyncEngine
from .chat_encoding import ChatEncoder
from .protocol import APIError
from .tenancy import TENANT_SCOPE_KEY, tenant_id, validate_api_key

if TYPE_CHECKING:
    from .metrics import ServerMetrics
    from .tenant_usage import TenantUsage

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "ServerSettings",
    "ServerState",
    "get_state",
    "served_model_name",
]

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 1024

logger = logging.getLogger(__name__)


def served_model_name(spec: str) -> str:
    """The model id clients use when ``--served-model-name`` is not given.

    ``default`` stays ``default``; a directory gives its name, a ``.gguf`` file its stem;
    ``dummy:<preset>`` stays as is and ``dummy:<dir>/config.json`` becomes ``dummy:<dir>``; a
    Hugging Face Hub id stays as is (as vLLM names it).
    """
    if spec.startswith("dummy:"):
        shape = spec[len("dummy:") :].split(",", 1)[0]
        if shape.endswith(".json"):
            path = Path(shape)
            name = (
                path.parent.name if path.name == "config.json" and path.parent.name else path.stem
            )
            return f"dummy:{name}"
        return f"dummy:{shape}"
    if spec == "default" or is_hub_id(spec):
        return spec
    path = Path(spec.rstrip("/\\"))
    if path.suffix == ".gguf":
        return path.stem
    return path.name or spec


@dataclass(frozen=True)
class ServerSettings:
    """How the server behaves around the engine.

    - ``model_name``: the id in ``/v1/models`` and the only ``model`` requests may name.
    - ``max_queue``: most requests waiting to run; beyond it new requests get 429.
    - ``request_timeout``: seconds a request may take in all; then it is aborted (504, or an
      error event in a stream).
    - ``shutdown_timeout``: seconds in-flight requests may keep running after SIGINT / SIGTERM.
    - ``api_keys``: when non-empty, every route but ``/health`` needs ``Authorization: Bearer
      <key>`` with one of them, and each key is its own prefix-cache namespace. Left out of
      ``repr`` so the keys never reach a log.
    - ``max_request_bytes``: largest request body accepted; larger ones get 413.
    - ``log_interval``: seconds between the statistics log lines written while the server is
      busy; 0 turns them off.
    - ``max_queue_per_key``: most requests (choices) one API key may have waiting; None: no
      per-key limit. Without API keys every client counts as one key.
    - ``admin_api_key``: a key that, besides being an ordinary key (its own namespace), may
      read ``/metrics`` and the engine-wide ``/v1/cache/stats``. Setting it turns keys on.
    - ``header_timeout``: seconds a connection may take to send a request's headers (also
      between requests once it has started sending one); then it is closed.
    - ``body_timeout``: seconds a request's body may take to arrive; then 408.
    - ``max_connections``: most open connections (and requests in progress); beyond it new
      requests get 503 at once.
    - ``cap_max_tokens``: answer a ``max_tokens`` that does not fit in the context after the
      prompt by generating up to the context's end (finish ``length``) instead of 400.
    - ``tool_call_parser``: how replies are parsed into tool calls (``hermes`` or
      ``llama3_json``); None reads it off the model's chat template (see tool_render.py).
    """

    model_name: str
    max_queue: int = 1024
    request_timeout: float = 600.0
    shutdown_timeout: float = 30.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    log_interval: float = 5.0
    max_queue_per_key: int | None = None
    admin_api_key: str | None = field(default=None, repr=False)
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    cap_max_tokens: bool = False
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        from .tool_parsers import TOOL_CALL_PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)} or None, got "
                f"{self.tool_call_parser!r}"
            )
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        keys: object = self.api_keys
        if isinstance(keys, str):
            raise TypeError("api_keys must be a sequence of keys, not one string")
        for i, key in enumerate(self.api_keys):
            validate_api_key(key, f"api_keys[{i}]")
        admin = self.admin_api_key
        if admin is not None:
            validate_api_key(admin, "admin_api_key")
        extra = (admin,) if admin is not None else ()
        object.__setattr__(self, "api_keys", tuple(dict.fromkeys(self.api_keys + extra)))
        if self.max_queue_per_key is not None and self.max_queue_per_key < 1:
            raise ValueError(f"max_queue_per_key must be >= 1, got {self.max_queue_per_key}")
        for name in ("header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if not self.log_interval >= 0:
            raise ValueError(f"log_interval must be >= 0, got {self.log_interval}")


@dataclass
class ServerState:
    """What one app instance owns: its engine, its settings and its lifecycle flags.

    ``draining`` is set when shutdown begins: new requests get 503 and, ``shutdown_timeout``
    seconds later, requests still running are aborted. ``metrics`` is the app's Prometheus
    registry and histograms (set by ``build_app``).
    """

    engine: AsyncEngine
    settings: ServerSettings
    metrics: ServerMetrics | None = None
    usage: TenantUsage | None = None
    draining: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    failure_hooks: list[Callable[[BaseException], None]] = field(default_factory=list)
    _drain_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _chat_encoder: ChatEncoder | None = field(default=None, repr=False)
    _chat_encoder_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def chat_encoder(self) -> ChatEncoder:
        """The engine tokenizer's ``ChatEncoder``, built on first use (any thread; raises
        ``EngineNotReadyError`` before the model is loaded)."""
        with self._chat_encoder_lock:
            if self._chat_encoder is None:
                self._chat_encoder = ChatEncoder(self.engine.engine.tokenizer)
            return self._chat_encoder

    def engine_failed(self, exc: BaseException) -> None:
        """Called in the event loop when the model fails to load or the engine stops for good:
        runs ``failure_hooks``."""
        for hook in self.failure_hooks:
            hook(exc)

    @property
    def engine_model_spec(self) -> str | None:
        """The engine's model spec (None until the model is loaded)."""
        return self.engine.engine.config.model if self.engine.ready else None

    def cache_namespace(self, request: Request, cache_salt: str) -> bytes:
        """The prefix-cache namespace of ``request`` (``cache_salt``: its own salt, or "").

        Requests share cached blocks only within one namespace. With API keys configured it is
        ``xxh3_128(key).digest()`` (16 bytes, set by the auth middleware) followed by the salt's
        UTF-8 bytes: a fixed-length prefix, so no two (key, salt) pairs give the same bytes and
        no tenant can reach another's blocks. Without keys it is the salt alone (empty: the
        namespace everyone shares). Raises ``APIError(401)`` if keys are configured but the
        request carries no authenticated tenant (the middleware was bypassed).
        """
        salt = cache_salt.encode("utf-8")
        if not self.settings.api_keys:
            return salt
        tenant = request.scope.get(TENANT_SCOPE_KEY)
        if not isinstance(tenant, bytes):
            raise APIError(401, "no valid API key", type="authentication_error")
        return tenant + salt

    def tenant(self, request: Request) -> bytes:
        """The request's tenant (``tenancy.tenant_id`` of its key), or b"" without API keys."""
        tenant = request.scope.get(TENANT_SCOPE_KEY)
        return tenant if isinstance(tenant, bytes) else b""

    def is_admin(self, request: Request) -> bool:
        """Whether ``request`` may see engine-wide figures: always on a server without API
        keys; with keys, only with ``admin_api_key``."""
        if not self.settings.api_keys:
            return True
        admin = self.settings.admin_api_key
        return admin is not None and self.tenant(request) == tenant_id(admin)

    def check_admin(self, request: Request, what: str) -> None:
        """Raise ``APIError(403)`` unless ``is_admin(request)``; ``what`` names the route."""
        if not self.is_admin(request):
            raise APIError(
                403,
                f"{what} shows figures of every tenant: only the admin key may read it "
                f"(--admin-api-key)",
                type="permission_error",
                code="admin_key_required",
            )

    def check_available(self) -> None:
        """Raise ``APIError(503)`` unless requests can be accepted now."""
        if self.draining:
            raise APIError(503, "the server is shutting down", type="service_unavailable")
        if self.engine.fatal_error is not None:
            raise APIError(
                503, f"the engine failed: {self.engine.fatal_error}", type="service_unavailable"
            )
        if not self.engine.ready:
            raise APIError(
                503,
                "the model is still loading; retry when /health answers 200"
                if self.engine.load_error is None
                else f"the model failed to load: {self.engine.load_error}",
                type="service_unavailable",
            )

    def check_model(self, model: str) -> None:
        """Raise ``APIError(404)`` unless ``model`` is the served model."""
        if model != self.settings.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves "
                f"'{self.settings.model_name}' (see /v1/models)",
                param="model",
                code="model_not_found",
            )

    def begin_drain(self) -> None:
        """Stop accepting requests; abort the ones still running after ``shutdown_timeout``.

        Safe to call from a signal handler or any thread; later calls do nothing more.
        """
        loop = self.loop
        if loop is None or loop.is_closed():
            self.draining = True
            return
        try:
            loop.call_soon_threadsafe(self._start_drain)
        except RuntimeError:  # the loop closed meanwhile
            self.draining = True

    def _start_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        timeout = self.settings.shutdown_timeout
        logger.info(
            "shutting down: %d request(s) in flight get up to %.0f s to finish",
            self.engine.num_unfinished,
            timeout,
        )
        assert self.loop is not None
        self._drain_timer = self.loop.call_later(timeout, self._abort_remaining)

    def _abort_remaining(self) -> None:
        if self.engine.num_unfinished:
            logger.warning(
                "shutdown timeout: aborting %d unfinished request(s)", self.engine.num_unfinished
            )
        self.engine.abort_all()


def get_state(request: Request) -> ServerState:
    """The ``ServerState`` of the app serving ``request``."""
    state: ServerState = request.app.state.llm
    return state
