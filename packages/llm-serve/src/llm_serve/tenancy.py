"""API keys, tenants and request-size limits: an ASGI middleware in front of every route.

With keys configured, every HTTP route but ``/health`` needs ``Authorization: Bearer <key>``.
The presented key is compared in constant time with every configured key (no early exit, so
the answer's timing says nothing about which key, or how much of one, matched); a request
without a valid key gets 401 with OpenAI's error body. The tenant of an authenticated request,
``xxh3_128(key).digest()``, goes into the ASGI scope under ``TENANT_SCOPE_KEY``, where
``ServerState.cache_namespace`` reads it. Keys are never logged or echoed.

Bodies larger than the limit get 413: at once when ``Content-Length`` says so, otherwise as
soon as the streamed body passes the limit. A body that has not fully arrived ``body_timeout``
seconds after the headers gets 408 and the connection is closed. A client that disconnects
mid-body costs one log line; the routes never see its request. Accepted bodies are buffered
here and handed on unchanged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import xxhash
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ADMIN_KEY_ENV",
    "API_KEYS_ENV",
    "OPEN_PATHS",
    "TENANT_SCOPE_KEY",
    "RequestGuard",
    "keys_from_env",
    "tenant_id",
    "validate_api_key",
]

logger = logging.getLogger(__name__)

API_KEYS_ENV = "LLM_SERVE_API_KEYS"
ADMIN_KEY_ENV = "LLM_SERVE_ADMIN_API_KEY"
TENANT_SCOPE_KEY = "llm_serve.tenant"
OPEN_PATHS = frozenset({"/health"})
TENANT_ID_BYTES = 16


def tenant_id(api_key: str) -> bytes:
    """The tenant of ``api_key``: ``xxh3_128`` of its UTF-8 bytes, 16 bytes (the prefix of
    every prefix-cache namespace of that key)."""
    return xxhash.xxh3_128(api_key.encode("utf-8")).digest()


def validate_api_key(key: object, what: str = "API key") -> str:
    """Return ``key`` if it can be sent in an ``Authorization`` header (non-empty printable
    ASCII without whitespace); raise ``ValueError`` (which never quotes the key) otherwise."""
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a string, got {type(key).__name__}")
    if not key:
        raise ValueError(f"{what} is empty")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise ValueError(f"{what} must be printable ASCII without spaces")
    return key


def keys_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """Keys from ``LLM_SERVE_API_KEYS`` (comma-separated; blanks around and between commas are
    ignored); raises ``ValueError`` for a key that is not printable ASCII."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    raw = env.get(API_KEYS_ENV, "")
    keys = [k.strip() for k in raw.split(",")]
    return [validate_api_key(k, f"a key in {API_KEYS_ENV}") for k in keys if k]


def _error(status: int, message: str, type_: str, code: str) -> tuple[bytes, list[Any]]:
    body = json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return body, headers


async def _respond(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    body, headers = _error(status, message, type_, code)
    headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class RequestGuard:
    """ASGI middleware: API-key check (when ``api_keys`` is non-empty) and a body size limit.

    ``open_paths`` (default: ``/health``) need no key. Non-HTTP scopes (lifespan) pass through.
    ``body_timeout``: seconds the whole body may take to arrive (408 after that).
    """

    def __init__(
        self,
        app: ASGIApp,
        api_keys: Sequence[str],
        max_request_bytes: int,
        open_paths: frozenset[str] = OPEN_PATHS,
        body_timeout: float = 60.0,
    ) -> None:
        self.app = app
        self._keys = [(validate_api_key(k).encode("ascii"), tenant_id(k)) for k in api_keys]
        self.max_request_bytes = max_request_bytes
        self.open_paths = open_paths
        self.body_timeout = body_timeout

    def _authenticate(self, scope: Scope) -> bytes | None:
        """The tenant of the request's bearer key, or None when it has no valid key."""
        presented = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
                break
        tenant: bytes | None = None
        for key, tid in self._keys:  # every key, no early exit
            if hmac.compare_digest(presented, key) and presented:
                tenant = tid
        return tenant

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._keys and scope.get("path", "") not in self.open_paths:
            tenant = self._authenticate(scope)
            if tenant is None:
                await _respond(
                    send,
                    401,
                    "a valid API key is required: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    "invalid_api_key",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            scope[TENANT_SCOPE_KEY] = tenant
        limit = self.max_request_bytes
        too_large = (
            f"the request body is larger than this server's limit of {limit} bytes "
            f"(--max-request-bytes)"
        )
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await _respond(send, 413, too_large, "invalid_request_error", "body_too_large")
                    return
        if scope.get("method", "GET") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            try:
                remaining = deadline - asyncio.get_running_loop().time()
                message = await asyncio.wait_for(receive(), max(remaining, 0.0))
            except asyncio.TimeoutError:
                logger.info(
                    "%s %s: the request body did not arrive within %g s (408)",
                    scope.get("method"),
                    scope.get("path"),
                    self.body_timeout,
                )
                await _respond(
                    send,
                    408,
                    f"the request body did not arrive within {self.body_timeout:g} s",
                    "invalid_request_error",
                    "request_timeout",
                    [(b"connection", b"close")],
                )
                return
            if message["type"] != "http.request":  # the client went away mid-body
                logger.info(
                    "%s %s: the client disconnected before sending the whole body",
                    scope.get("method"),
                    scope.get("path"),
                )
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _respond(send, 413, too_large, "invalid_request_error", "body_too_large")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that yields ``messages`` first, then defers to ``receive``."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
