"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's request and response shapes), ``GET /version``."""

from __future__ import annotations

import asyncio
from importlib.metadata import version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .openai_api import chat_messages, chat_prompt, parse_call
from .protocol import APIError, DetokenizeRequest, TokenizeRequest
from .state import ServerState

__all__ = ["tokenize_router"]


def _tokenize(state: ServerState, req: TokenizeRequest) -> list[int]:
    engine = state.engine.engine
    if req.messages is not None and req.prompt is None:
        return chat_prompt(state, chat_messages(req.messages), req.template_options())
    if req.prompt is None or req.messages is not None:
        raise APIError(400, "send exactly one of 'prompt' and 'messages'", param="prompt")
    special = req.add_special_tokens is not False
    return list(engine.tokenizer.encode(req.prompt, add_special_tokens=special))


def tokenize_router() -> APIRouter:
    """``/tokenize`` answers ``{"count", "max_model_len", "tokens", "token_strs": null}``;
    ``/detokenize`` answers ``{"prompt"}``; ``/version`` answers ``{"version"}``."""
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        state, req = await parse_call(request, TokenizeRequest)
        engine = state.engine.engine
        ids = await asyncio.to_thread(_tokenize, state, req)
        body = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        return JSONResponse({**body, "token_strs": None})

    @router.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        state, detok = await parse_call(request, DetokenizeRequest)
        engine = state.engine.engine
        vocab = engine.model_config.vocab_size
        bad = [t for t in detok.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": engine.tokenizer.decode(detok.tokens)})

    @router.get("/version")
    async def server_version() -> Response:
        return JSONResponse({"version": version("llm-serve")})

    return router
