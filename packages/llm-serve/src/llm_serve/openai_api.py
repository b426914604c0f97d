"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

A request is parsed and checked (400 / 404 with OpenAI's error body), its prompts tokenized and
checked by the engine off the event loop, then run as an ``ApiCall`` (api_call.py) and answered
in its endpoint's format (formats.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, NoReturn, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from paged_engine import LLMEngine, PromptTooLongError
from paged_engine.llm_engine import Prompt, as_batch

from .api_call import ApiCall, json_response
from .formats import ChatFormat, CompletionFormat
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelCard,
    ModelList,
    parse_request,
    unsupported_fields,
)
from .request_checks import check_admissible, check_context_length, check_stream_options
from .sampling import request_sampling_values, sampling_params
from .state import ServerState, get_state
from .structured import constrain
from .tool_format import ToolChatFormat
from .tool_render import (
    choose_parser,
    render_messages,
    required_call_constraint,
    template_supports_tools,
    tool_context,
)

__all__ = ["openai_router"]

_M = TypeVar("_M", bound=BaseModel)
_CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def openai_router() -> APIRouter:
    """A fresh router with the OpenAI-compatible routes (state comes from ``app.state.llm``)."""
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request) -> Response:
        state = get_state(request)
        max_len = state.engine.engine.max_model_len if state.engine.ready else None
        name = state.settings.model_name  # never the model's path
        card = ModelCard(id=name, root=name, max_model_len=max_len)
        return json_response(ModelList(data=[card]))

    @router.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        state, req = await parse_call(request, CompletionRequest)
        _check_sampling(req)
        check_stream_options(req)
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            _unsupported("best_of", "only best_of == n (or unset) is supported")
        if req.echo:
            _unsupported("echo")
        values = request_sampling_values(req)
        params = sampling_params(values, defaults={"max_tokens": 16})
        engine = state.engine.engine
        prompts = as_batch(req.prompt)
        check_admissible(len(prompts) * n, n, state.settings)
        params = await constrain(engine, req, params, None, state.settings.request_timeout)
        token_ids = await asyncio.to_thread(_check_prompts, engine, prompts, "prompt")
        lens = [len(t) for t in token_ids]
        check_context_length(
            lens, values, _context(engine), "prompt", state.settings.cap_max_tokens
        )
        call = ApiCall.start(state, request, "cmpl", token_ids, params, n, req.cache_salt or "")
        fmt = CompletionFormat(call.api_id, req.model, engine.tokenizer, params.logprobs)
        return await call.respond(fmt, bool(req.stream), _include_usage(req))

    @router.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        state, req = await parse_call(request, ChatCompletionRequest)
        _check_sampling(req)
        check_stream_options(req)
        engine = state.engine.engine
        values = request_sampling_values(req)
        params = sampling_params(values, defaults={"max_tokens": engine.max_model_len})
        check_admissible(req.n or 1, req.n or 1, state.settings)
        tools = tool_context(req.tools, req.tool_choice, req.parallel_tool_calls)
        native = template_supports_tools(engine.tokenizer)
        parser = choose_parser(engine.tokenizer, state.settings.tool_call_parser)
        messages = render_messages(chat_messages(req.messages), req.messages, tools, native)
        options = req.template_options()
        if native and tools.tools:
            options["chat_template_kwargs"] = {
                **(options["chat_template_kwargs"] or {}),
                "tools": tools.tools,
            }
        forced = None
        if tools.choice in ("required", "named"):
            grammar = await asyncio.to_thread(required_call_constraint, tools, parser)
            forced = ("tool_choice", grammar)
        params = await constrain(engine, req, params, forced, state.settings.request_timeout)
        ids = await asyncio.to_thread(chat_prompt, state, messages, options)
        token_ids = await asyncio.to_thread(_check_prompts, engine, [ids], "messages")
        check_context_length(
            [len(ids)], values, _context(engine), "messages", state.settings.cap_max_tokens
        )
        call = ApiCall.start(
            state, request, "chatcmpl", token_ids, params, req.n or 1, req.cache_salt or ""
        )
        fmt: ChatFormat = ChatFormat(call.api_id, req.model, engine.tokenizer, params.logprobs)
        if tools.parses:
            fmt = ToolChatFormat(
                call.api_id, req.model, engine.tokenizer, params.logprobs, tool_format=parser
            )
        return await call.respond(fmt, bool(req.stream), _include_usage(req))

    return router


# -- parsing helpers ------------------------------------------------------------------------------


def _unsupported(name: str, detail: str = "") -> NoReturn:
    raise APIError(
        400,
        f"'{name}' is not supported by this server"
        + (f": {detail}" if detail else "; leave it unset"),
        param=name,
        code="unsupported_parameter",
    )


async def parse_call(request: Request, model: type[_M]) -> tuple[ServerState, _M]:
    """The app's state and the request body parsed as ``model``, checked: the server is
    available (503), the body is valid (400), its ``model`` if any is served (404) and it sets
    no field this server does not implement (400)."""
    state = get_state(request)
    state.check_available()
    req = parse_request(model, await request.body())
    if getattr(req, "model", None) is not None:
        state.check_model(req.model)  # type: ignore[attr-defined]
    names = unsupported_fields(req)
    if names:
        raise APIError(
            400,
            f"not supported by this server: {', '.join(repr(n) for n in names)}; leave "
            f"{'it' if len(names) == 1 else 'them'} unset, null or empty",
            param=names[0],
            code="unsupported_parameter",
        )
    return state, req


def _check_sampling(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Refuse what no value but the default can mean here."""
    if req.priority not in (None, 0):
        _unsupported("priority", "requests are served first come, first served; send 0")
    if req.stream and req.prompt_logprobs is not None:
        _unsupported("prompt_logprobs", "not with stream: true")


def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(req.stream_options is not None and req.stream_options.include_usage)


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = _CHAT_ROLES.get(m.role)
        if role is None:
            raise APIError(
                400,
                f"messages[{i}].role {m.role!r} is not supported; use system, developer, user, "
                f"assistant or tool",
                param=f"messages[{i}].role",
            )
        content = m.content
        if isinstance(content, list):
            parts: list[str] = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"messages[{i}].content[{j}] has type {part.type!r}; only text parts "
                        f"are supported",
                        param=f"messages[{i}].content[{j}].type",
                    )
                parts.append(part.text)
            content = "".join(parts)
        msg: dict[str, Any] = {"role": role, "content": content or ""}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def _check_prompts(engine: LLMEngine, prompts: Sequence[Prompt], param: str) -> list[list[int]]:
    """Each prompt's token ids, checked by the engine; a bad one is a 400 naming ``param``."""
    if not prompts:
        raise APIError(400, f"'{param}' is empty", param=param)
    out: list[list[int]] = []
    for p in prompts:
        try:
            out.append(engine.check_prompt(p))
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param=param) from None
    return out


def _context(engine: LLMEngine) -> int:
    """Most tokens one sequence may hold: the model's context, or less if the KV pool is
    smaller."""
    return min(engine.max_model_len, int(getattr(engine, "max_seq_len", engine.max_model_len)))


def chat_prompt(
    state: ServerState, messages: list[dict[str, Any]], options: dict[str, Any]
) -> list[int]:
    """The chat's token ids (``LLMEngine.chat_prompt``'s options), with special tokens typed
    in the messages kept as text (``chat_encoding``); a template failure is a 400 naming
    ``messages``."""
    try:
        return state.chat_encoder().encode(messages, **options)
    except Exception as exc:  # templates raise anything (jinja errors, their own checks)
        raise APIError(
            400, f"this model's chat template cannot format these messages: {exc}", param="messages"
        ) from None
