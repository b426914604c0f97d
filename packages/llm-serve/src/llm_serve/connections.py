"""Connection-level protection for uvicorn: a header read timeout and the connection cap.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and caps connections and
tasks (``limit_concurrency``: beyond it requests get 503), but it waits forever for the headers
of a request: a client that opens a socket and sends nothing, or half a request line, holds the
connection. ``header_timeout_protocol`` adds that timeout to uvicorn's h11 protocol: from the
moment a connection opens, and again after each response, the client has ``seconds`` to finish
sending a request's headers, or the connection is closed. The body's own timeout is the app's
(``tenancy.RequestGuard``), which reads every body before routing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["header_timeout_protocol", "uvicorn_config"]

logger = logging.getLogger(__name__)


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers take longer than
    ``seconds`` (counted from connect, and from the end of the previous response)."""
    if not seconds > 0:
        raise ValueError(f"the header timeout must be > 0 seconds, got {seconds}")

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            waiting_for_headers = self.cycle is None or self.cycle.response_complete
            if waiting_for_headers and not self.transport.is_closing():
                logger.info(
                    "closed a connection from %s: no complete request headers within %g s",
                    _peer(self.client),
                    seconds,
                )
                self.transport.close()

    return HeaderTimeoutProtocol


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "an unknown client"


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    log_level: str,
    header_timeout: float,
    max_connections: int,
    graceful_shutdown: int,
) -> uvicorn.Config:
    """The uvicorn configuration of a server: h11 with the header timeout, at most
    ``max_connections`` connections or requests in progress (503 beyond), access log only at
    debug level."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=header_timeout_protocol(header_timeout),
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=graceful_shutdown,
        access_log=log_level == "debug",
    )
