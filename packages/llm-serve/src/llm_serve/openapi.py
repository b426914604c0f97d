"""The server's OpenAPI document, with the request and response bodies the routes really use.

The routes parse their JSON bodies themselves (strictly, see ``protocol.parse_request``), so
FastAPI cannot see them; ``document_api(app)`` makes ``/openapi.json`` describe them: the
request schemas of the completion, chat and cache-reset routes, each route's success body,
and OpenAI's error body for every other status. Clients and API fuzzers (schemathesis) read
it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)

__all__ = ["document_api"]

_REF = "#/components/schemas/{model}"


def _json(ref: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": ref}}


def document_api(app: FastAPI, cache_reset_body: type[BaseModel], model_name: str) -> None:
    """Replace ``app.openapi`` with one that documents the routes' bodies (built once);
    ``model`` is documented as the one name the server accepts, ``model_name``."""
    models: list[type[BaseModel]] = [
        CompletionRequest,
        ChatCompletionRequest,
        cache_reset_body,
        CompletionResponse,
        ChatCompletionResponse,
        ErrorResponse,
        ModelList,
    ]
    refs_in, defs = models_json_schema(
        [(m, "validation") for m in models[:3]] + [(m, "serialization") for m in models[3:]],
        ref_template=_REF,
    )
    ref = {
        m: refs_in[(m, "validation" if i < 3 else "serialization")] for i, m in enumerate(models)
    }
    for request in (CompletionRequest, ChatCompletionRequest):
        props = defs["$defs"][request.__name__]["properties"]
        props["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
    error = {"description": "OpenAI's error body", "content": _json(ref[ErrorResponse])}
    any_object: dict[str, Any] = {"type": "object"}
    # One server-sent event: its ``data`` is a JSON chunk of the stream, or ``[DONE]``.
    sse_event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    event_stream = {"text/event-stream": {"schema": sse_event}}
    default_openapi = app.openapi

    def body(
        model: type[BaseModel], required: bool = True, example: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        content = _json(ref[model])
        if example is not None:
            content["application/json"]["example"] = example
        return {"required": required, "content": content}

    completion_example = {"model": model_name, "prompt": "Once upon a time", "max_tokens": 8}
    chat_example = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
    }

    routes: dict[tuple[str, str], dict[str, Any]] = {
        ("/v1/completions", "post"): {
            "requestBody": body(CompletionRequest, example=completion_example),
            "responses": {
                "200": {
                    "description": "the completion, or server-sent events with 'stream'",
                    "content": {**_json(ref[CompletionResponse]), **event_stream},
                }
            },
        },
        ("/v1/chat/completions", "post"): {
            "requestBody": body(ChatCompletionRequest, example=chat_example),
            "responses": {
                "200": {
                    "description": "the chat completion, or server-sent events with 'stream'",
                    "content": {**_json(ref[ChatCompletionResponse]), **event_stream},
                }
            },
        },
        ("/v1/models", "get"): {
            "responses": {
                "200": {"description": "the served model", "content": _json(ref[ModelList])}
            }
        },
        ("/health", "get"): {
            "responses": {"200": {"description": "ready", "content": _json(any_object)}}
        },
        ("/metrics", "get"): {
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            }
        },
        ("/v1/cache/stats", "get"): {
            "responses": {"200": {"description": "cache statistics", "content": _json(any_object)}}
        },
        ("/v1/cache/reset", "post"): {
            "requestBody": body(cache_reset_body, required=False),
            "responses": {"200": {"description": "blocks freed", "content": _json(any_object)}},
        },
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        for path, methods in schema.get("paths", {}).items():
            for method, operation in methods.items():
                doc = routes.get((path, method), {})
                if "requestBody" in doc:
                    operation["requestBody"] = doc["requestBody"]
                # every route answers its errors with OpenAI's error body
                responses = doc.get("responses", operation.get("responses", {}))
                operation["responses"] = {**responses, "default": error}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
