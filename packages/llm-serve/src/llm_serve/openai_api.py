"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

A request is parsed and checked (400 / 404 with OpenAI's error body), its prompts tokenized off
the event loop, its choices queued on the engine as one group (429 when the waiting queue is
full), then answered as one JSON body or as server-sent events ending with ``data: [DONE]``.
A request is aborted when its client disconnects, when ``request_timeout`` passes, or when
shutdown runs out of time; an aborted stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from paged_engine import LLMEngine, RequestOutput, SamplingParams

from .async_engine import (
    EngineDeadError,
    EngineNotReadyError,
    EngineRequest,
    OutputStream,
    QueueFullError,
)
from .protocol import (
    APIError,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
    parse_request,
    unsupported_fields,
)
from .sampling import engine_accepts, request_sampling_values, sampling_params
from .state import ServerState, get_state

__all__ = ["openai_router"]

_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def openai_router() -> APIRouter:
    """A fresh router with the OpenAI-compatible routes (state comes from ``app.state.llm``)."""
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request) -> Response:
        state = get_state(request)
        max_len = state.engine.engine.max_model_len if state.engine.ready else None
        cards = ModelList(
            data=[
                ModelCard(
                    id=state.settings.model_name,
                    root=state.engine_model_spec,
                    max_model_len=max_len,
                )
            ]
        )
        return _json(cards)

    @router.post("/v1/completions")
    async def create_completion(request: Request) -> Response:
        state = get_state(request)
        state.check_available()
        req = parse_request(CompletionRequest, await request.body())
        state.check_model(req.model)
        _reject_unsupported(req)
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            _unsupported("best_of", "only best_of == n (or unset) is supported")
        if req.echo:
            _unsupported("echo")
        params = sampling_params(request_sampling_values(req), defaults={"max_tokens": 16})
        engine = state.engine.engine
        prompts = _completion_prompts(req.prompt)
        token_ids = await asyncio.to_thread(_tokenize_completion, engine, prompts)
        call = _Call.start(state, request, "cmpl", req.model, token_ids, params, n, req, "prompt")
        if req.stream:
            return _sse(call.stream_completion(_include_usage(req)))
        return _json(await call.complete_completion())

    @router.post("/v1/chat/completions")
    async def create_chat_completion(request: Request) -> Response:
        state = get_state(request)
        state.check_available()
        req = parse_request(ChatCompletionRequest, await request.body())
        state.check_model(req.model)
        _reject_unsupported(req)
        engine = state.engine.engine
        params = sampling_params(
            request_sampling_values(req), defaults={"max_tokens": engine.max_model_len}
        )
        messages = _chat_messages(req.messages)
        token_ids = await asyncio.to_thread(_tokenize_chat, engine, messages)
        call = _Call.start(
            state, request, "chatcmpl", req.model, [token_ids], params, req.n or 1, req, "messages"
        )
        if req.stream:
            return _sse(call.stream_chat(_include_usage(req)))
        return _json(await call.complete_chat())

    return router


# -- parsing helpers ------------------------------------------------------------------------------


def _unsupported(name: str, detail: str = "") -> None:
    raise APIError(
        400,
        f"'{name}' is not supported by this server"
        + (f": {detail}" if detail else "; leave it unset"),
        param=name,
        code="unsupported_parameter",
    )


def _reject_unsupported(req: BaseModel) -> None:
    names = unsupported_fields(req)
    if names:
        raise APIError(
            400,
            f"not supported by this server: {', '.join(repr(n) for n in names)}; leave "
            f"{'it' if len(names) == 1 else 'them'} unset, null or empty",
            param=names[0],
            code="unsupported_parameter",
        )


def _include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(req.stream_options is not None and req.stream_options.include_usage)


def _completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]],
) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "'prompt' is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = _CHAT_ROLES.get(m.role)
        if role is None:
            raise APIError(
                400,
                f"messages[{i}].role {m.role!r} is not supported; use system, developer, user "
                f"or assistant",
                param=f"messages[{i}].role",
            )
        if m.tool_calls:
            _unsupported(f"messages[{i}].tool_calls")
        if m.tool_call_id:
            _unsupported(f"messages[{i}].tool_call_id")
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


def _check_prompt(engine: LLMEngine, ids: list[int], param: str) -> list[int]:
    if not ids:
        raise APIError(400, f"the prompt ('{param}') is empty", param=param)
    limit = min(engine.max_model_len, int(getattr(engine, "max_seq_len", engine.max_model_len)))
    if len(ids) >= limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens; the prompt has "
            f"{len(ids)} tokens, which leaves no room for output. Shorten '{param}'.",
            param=param,
            code="context_length_exceeded",
        )
    return ids


def _tokenize_completion(engine: LLMEngine, prompts: list[str | list[int]]) -> list[list[int]]:
    vocab = engine.model_config.vocab_size
    out: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            ids = [int(t) for t in engine.tokenizer.encode(p)]
        else:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(
                    400,
                    f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                    param="prompt",
                )
            ids = list(p)
        out.append(_check_prompt(engine, ids, "prompt"))
    return out


def _tokenize_chat(engine: LLMEngine, messages: list[dict[str, Any]]) -> list[int]:
    tok: Any = engine.tokenizer
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        raise APIError(
            400, f"this model's chat template cannot format these messages: {exc}", param="messages"
        ) from None
    if not isinstance(text, str):
        raise APIError(500, "the chat template did not return text", type="internal_error")
    ids = [int(t) for t in tok.encode(text, add_special_tokens=False)]
    return _check_prompt(engine, ids, "messages")


# -- responses ------------------------------------------------------------------------------------


def _json(body: BaseModel) -> Response:
    return Response(content=body.model_dump_json(), media_type="application/json")


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(body: BaseModel | Mapping[str, Any]) -> str:
    if isinstance(body, BaseModel):
        return f"data: {body.model_dump_json()}\n\n"
    return f"data: {json.dumps(body)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Returns once the client has gone (the request body must already be read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _failure(out: RequestOutput, draining: bool) -> APIError | None:
    """The error to answer for a request that ended without a normal finish, else None."""
    if out.finish_reason == "error":
        if out.internal_error:
            return APIError(500, out.error or "internal error", type="internal_error")
        return APIError(400, out.error or "the engine rejected the request", param=out.error_param)
    if out.finish_reason == "abort":
        if draining:
            return APIError(
                503,
                "the request was aborted: the server is shutting down",
                type="service_unavailable",
            )
        return APIError(500, "the request was aborted", type="internal_error")
    return None


def _logprobs_of(out: RequestOutput) -> list[Mapping[int, float]] | None:
    """Per generated token, a mapping token id -> logprob holding the sampled token first and
    then the top alternatives, when the engine reports them (``RequestOutput.logprobs``)."""
    value = getattr(out, "logprobs", None)
    return None if value is None else list(value)


@dataclasses.dataclass
class _Call:
    """One API call in flight: its engine requests (prompt i, sample j), and how to answer."""

    state: ServerState
    request: Request
    api_id: str
    model: str
    prompts: list[list[int]]
    n: int
    stream: OutputStream
    index: dict[str, int]  # engine request id -> choice index (i * n + j)
    deadline: float
    top_logprobs: int | None  # None: no logprobs wanted

    @classmethod
    def start(
        cls,
        state: ServerState,
        request: Request,
        prefix: str,
        model: str,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        req: CompletionRequest | ChatCompletionRequest,
        prompt_param: str,
    ) -> _Call:
        """Queue every choice on the engine; raises ``APIError`` (429, 503, 400)."""
        api_id = f"{prefix}-{uuid.uuid4().hex}"
        extra: dict[str, Any] = {}
        namespace = state.cache_namespace(request, req.cache_salt or "")
        if namespace:
            if not engine_accepts("cache_salt"):
                _unsupported(
                    "cache_salt", "this server's engine has no prefix-cache namespaces yet"
                )
            extra["cache_salt"] = namespace
        requests: list[EngineRequest] = []
        index: dict[str, int] = {}
        for i, ids in enumerate(prompts):
            for j in range(n):
                p = params
                if j and params.seed is not None:
                    p = dataclasses.replace(params, seed=params.seed + j)
                rid = f"{api_id}-{i}-{j}"
                index[rid] = i * n + j
                requests.append(EngineRequest(rid, ids, p, dict(extra)))
        top_logprobs: int | None = getattr(params, "logprobs", None)
        if top_logprobs is not None and "logprobs" not in {
            f.name for f in dataclasses.fields(RequestOutput)
        }:
            _unsupported("logprobs", "this server's engine does not report logprobs yet")
        try:
            stream = state.engine.add(requests)
        except QueueFullError as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from None
        except (EngineNotReadyError, EngineDeadError) as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        loop = asyncio.get_running_loop()
        return cls(
            state=state,
            request=request,
            api_id=api_id,
            model=model,
            prompts=prompts,
            n=n,
            stream=stream,
            index=index,
            deadline=loop.time() + state.settings.request_timeout,
            top_logprobs=top_logprobs,
        )

    # -- shared ---------------------------------------------------------------------------------

    def _timeout_error(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within the server's request timeout "
            f"({self.state.settings.request_timeout:g} s) and was aborted",
            type="timeout_error",
            code="request_timeout",
        )

    async def _next(self) -> RequestOutput:
        remaining = self.deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise self._timeout_error()
        try:
            return await asyncio.wait_for(self.stream.get(), remaining)
        except asyncio.TimeoutError:
            raise self._timeout_error() from None
        except EngineDeadError as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None

    async def _finals(self) -> list[RequestOutput]:
        """Wait for every choice's final output, watching for disconnect and the deadline."""
        finals: dict[str, RequestOutput] = {}

        async def collect() -> None:
            while len(finals) < len(self.index):
                out = await self._next()
                if out.finished:
                    finals[out.request_id] = out

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_wait_disconnect(self.request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                raise APIError(499, "the client disconnected", code="client_closed_request")
            work.result()
        finally:
            for task in (work, gone):
                task.cancel()
            self.stream.abort()
        ordered = sorted(finals.values(), key=lambda o: self.index[o.request_id])
        for out in ordered:
            err = _failure(out, self.state.draining)
            if err is not None:
                raise err
        return ordered

    def _usage(self, outs: Sequence[RequestOutput]) -> UsageInfo:
        cached: dict[int, int] = {}
        for out in outs:
            i = self.index[out.request_id] // self.n
            cached[i] = min(cached.get(i, out.num_cached_tokens), out.num_cached_tokens)
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(o.token_ids) for o in outs)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())),
        )

    async def _deltas(
        self, on_delta: Callable[[int, RequestOutput, str, int], list[str]]
    ) -> AsyncIterator[str]:
        """Run the call as a stream: ``on_delta(choice, output, new_text, first_new_token)`` makes
        the events of one output; ends with the usage and ``[DONE]`` events being the caller's."""
        sent_text: dict[str, int] = dict.fromkeys(self.index, 0)
        sent_tokens: dict[str, int] = dict.fromkeys(self.index, 0)
        while not self.stream.finished:
            out = await self._next()
            err = _failure(out, self.state.draining)
            if err is not None:
                raise err
            rid = out.request_id
            delta = out.text[sent_text[rid] :]
            first = sent_tokens[rid]
            sent_text[rid] = len(out.text)
            sent_tokens[rid] = len(out.token_ids)
            if (
                delta
                or out.finished
                or (self.top_logprobs is not None and len(out.token_ids) > first)
            ):
                for ev in on_delta(self.index[rid], out, delta, first):
                    yield ev

    async def _run_stream(
        self,
        first: list[str],
        on_delta: Callable[[int, RequestOutput, str, int], list[str]],
        usage_event: Callable[[UsageInfo], str] | None,
    ) -> AsyncIterator[str]:
        finals: list[RequestOutput] = []
        try:
            for ev in first:
                yield ev

            def track(choice: int, out: RequestOutput, delta: str, first_tok: int) -> list[str]:
                if out.finished:
                    finals.append(out)
                return on_delta(choice, out, delta, first_tok)

            async for ev in self._deltas(track):
                yield ev
            if usage_event is not None:
                yield usage_event(self._usage(finals))
            yield "data: [DONE]\n\n"
        except APIError as err:
            yield _event(err.body())
            yield "data: [DONE]\n\n"
        finally:
            # Runs on normal end, on error, and when the client disconnects (cancellation).
            self.stream.abort()

    # -- completions ----------------------------------------------------------------------------

    def _token_logprobs(
        self, out: RequestOutput, start: int
    ) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """For each generated token from ``start``: its text, its logprob, and the
        ``top_logprobs`` most likely (text, logprob) pairs, most likely first."""
        per_token = _logprobs_of(out) or []
        tok: Any = self.state.engine.engine.tokenizer
        n = self.top_logprobs or 0
        rows: list[tuple[str, float, list[tuple[str, float]]]] = []
        for tid, entry in zip(out.token_ids[start:], per_token[start:], strict=False):
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:n]
            rows.append(
                (
                    tok.decode([tid]),
                    float(entry.get(tid, float("-inf"))),
                    [(tok.decode([t]), float(v)) for t, v in ranked],
                )
            )
        return rows

    def _completion_logprobs(
        self, out: RequestOutput, start: int, offset: int
    ) -> CompletionLogprobs | None:
        if self.top_logprobs is None:
            return None
        lp = CompletionLogprobs()
        for text, logprob, top in self._token_logprobs(out, start):
            lp.tokens.append(text)
            lp.token_logprobs.append(logprob)
            lp.top_logprobs.append(dict(top))
            lp.text_offset.append(offset)
            offset += len(text)
        return lp

    async def complete_completion(self) -> CompletionResponse:
        outs = await self._finals()
        return CompletionResponse(
            id=self.api_id,
            model=self.model,
            choices=[
                CompletionChoice(
                    index=self.index[o.request_id],
                    text=o.text,
                    logprobs=self._completion_logprobs(o, 0, 0),
                    finish_reason=o.finish_reason,
                )
                for o in outs
            ],
            usage=self._usage(outs),
        )

    def stream_completion(self, include_usage: bool) -> AsyncIterator[str]:
        def on_delta(choice: int, out: RequestOutput, delta: str, first: int) -> list[str]:
            chunk = CompletionStreamResponse(
                id=self.api_id,
                model=self.model,
                choices=[
                    CompletionChoice(
                        index=choice,
                        text=delta,
                        logprobs=self._completion_logprobs(out, first, len(out.text) - len(delta)),
                        finish_reason=out.finish_reason if out.finished else None,
                    )
                ],
            )
            return [_event(chunk)]

        def usage(u: UsageInfo) -> str:
            return _event(
                CompletionStreamResponse(id=self.api_id, model=self.model, choices=[], usage=u)
            )

        return self._run_stream([], on_delta, usage if include_usage else None)

    # -- chat -----------------------------------------------------------------------------------

    def _chat_logprobs(self, out: RequestOutput, start: int) -> ChatLogprobs | None:
        if self.top_logprobs is None:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=text,
                    logprob=logprob,
                    bytes=list(text.encode("utf-8")),
                    top_logprobs=[
                        TopLogprob(token=t, logprob=v, bytes=list(t.encode("utf-8")))
                        for t, v in top
                    ],
                )
                for text, logprob, top in self._token_logprobs(out, start)
            ]
        )

    async def complete_chat(self) -> ChatCompletionResponse:
        outs = await self._finals()
        return ChatCompletionResponse(
            id=self.api_id,
            model=self.model,
            choices=[
                ChatChoice(
                    index=self.index[o.request_id],
                    message=ChatResponseMessage(content=o.text),
                    logprobs=self._chat_logprobs(o, 0),
                    finish_reason=o.finish_reason,
                )
                for o in outs
            ],
            usage=self._usage(outs),
        )

    def stream_chat(self, include_usage: bool) -> AsyncIterator[str]:
        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return _event(
                ChatCompletionChunk(id=self.api_id, model=self.model, choices=choices, usage=usage)
            )

        first = [
            chunk([ChatStreamChoice(index=k, delta=DeltaMessage(role="assistant", content=""))])
            for k in range(len(self.index))
        ]

        def on_delta(choice: int, out: RequestOutput, delta: str, start: int) -> list[str]:
            return [
                chunk(
                    [
                        ChatStreamChoice(
                            index=choice,
                            delta=DeltaMessage(content=delta if delta else None),
                            logprobs=self._chat_logprobs(out, start),
                            finish_reason=out.finish_reason if out.finished else None,
                        )
                    ]
                )
            ]

        def usage(u: UsageInfo) -> str:
            return chunk([], u)

        return self._run_stream(first, on_delta, usage if include_usage else None)
