"""One API call in flight: the lifecycle shared by ``/v1/completions`` and ``/v1/chat/completions``.

Its choices are queued on the engine as one group (429 when the waiting queue is full, 503 when
the engine cannot serve), their outputs awaited within ``request_timeout`` (504), and the group is
aborted when the client disconnects (499), when the call ends, or when shutdown runs out of time.
How outputs become JSON is a ``ResponseFormat``'s business (formats.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from paged_engine import RequestOutput, SamplingParams

from .async_engine import (
    EngineDeadError,
    EngineNotReadyError,
    EngineRequest,
    OutputStream,
    QueueFullError,
)
from .protocol import APIError, PromptTokensDetails, UsageInfo
from .request_checks import queue_full
from .state import ServerState

__all__ = ["ApiCall", "ResponseFormat", "json_response"]


class ResponseFormat(Protocol):
    """The JSON bodies of one endpoint: the whole answer, or the stream's chunks (``chunk``:
    choice ``choice``'s output ``out`` brought the text ``delta`` and tokens from ``first``)."""

    def response(self, outs: list[RequestOutput], usage: UsageInfo) -> BaseModel: ...
    def opening(self, num_choices: int) -> Sequence[BaseModel]: ...
    def chunk(self, choice: int, out: RequestOutput, delta: str, first: int) -> BaseModel: ...
    def usage_chunk(self, usage: UsageInfo) -> BaseModel: ...


def json_response(body: BaseModel) -> Response:
    return Response(content=body.model_dump_json(), media_type="application/json")


def _event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


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
        why = ": the server is shutting down" if draining else ""
        status, kind = (503, "service_unavailable") if draining else (500, "internal_error")
        return APIError(status, f"the request was aborted{why}", type=kind)
    return None


@dataclasses.dataclass
class ApiCall:
    """The engine requests of one API call (prompt i, sample j is choice ``i * n + j``)."""

    state: ServerState
    request: Request
    api_id: str
    prompts: list[list[int]]
    n: int
    stream: OutputStream
    index: dict[str, int]  # engine request id -> choice index
    deadline: float
    stream_tokens: bool  # send a chunk for new tokens even without new text (logprobs)

    @classmethod
    def start(
        cls,
        state: ServerState,
        request: Request,
        prefix: str,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        cache_salt: str,
    ) -> ApiCall:
        """Queue every choice on the engine; raises ``APIError`` (429, 503, 401)."""
        api_id = f"{prefix}-{uuid.uuid4().hex}"
        namespace = state.cache_namespace(request, cache_salt)
        requests: list[EngineRequest] = []
        index: dict[str, int] = {}
        for i, ids in enumerate(prompts):
            for j in range(n):
                p = params
                if j and params.seed is not None:
                    p = dataclasses.replace(params, seed=params.seed + j)
                rid = f"{api_id}-{i}-{j}"
                index[rid] = i * n + j
                requests.append(EngineRequest(rid, ids, p, namespace))
        try:
            stream = state.engine.add(
                requests, state.tenant(request), state.settings.max_queue_per_key
            )
        except QueueFullError as exc:
            raise queue_full(str(exc)) from None
        except (EngineNotReadyError, EngineDeadError) as exc:
            raise APIError(503, str(exc), type="service_unavailable") from None
        deadline = asyncio.get_running_loop().time() + state.settings.request_timeout
        return cls(
            state, request, api_id, prompts, n, stream, index, deadline, params.logprobs is not None
        )

    async def respond(self, fmt: ResponseFormat, stream: bool, include_usage: bool) -> Response:
        """The HTTP answer: one JSON body, or server-sent events ending with ``[DONE]``."""
        if not stream:
            outs = await self._finals()
            return json_response(fmt.response(outs, self._usage(outs)))
        return StreamingResponse(
            self._events(fmt, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

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

    async def _events(self, fmt: ResponseFormat, include_usage: bool) -> AsyncIterator[str]:
        """The stream: opening chunks, one chunk per output with news, usage, ``[DONE]``; an
        error ends it with an error event."""
        finals: list[RequestOutput] = []
        sent_text: dict[str, int] = dict.fromkeys(self.index, 0)
        sent_tokens: dict[str, int] = dict.fromkeys(self.index, 0)
        try:
            for body in fmt.opening(len(self.index)):
                yield _event(body)
            while not self.stream.finished:
                out = await self._next()
                err = _failure(out, self.state.draining)
                if err is not None:
                    raise err
                rid = out.request_id
                delta = out.text[sent_text[rid] :]
                first = sent_tokens[rid]
                sent_text[rid], sent_tokens[rid] = len(out.text), len(out.token_ids)
                if out.finished:
                    finals.append(out)
                if delta or out.finished or (self.stream_tokens and len(out.token_ids) > first):
                    yield _event(fmt.chunk(self.index[rid], out, delta, first))
            if include_usage:
                yield _event(fmt.usage_chunk(self._usage(finals)))
            yield "data: [DONE]\n\n"
        except APIError as err:
            yield _event(err.body())
            yield "data: [DONE]\n\n"
        finally:
            # Runs on normal end, on error, and when the client disconnects (cancellation).
            self.stream.abort()
