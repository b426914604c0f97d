"""The two OpenAI answer formats: text completions and chat completions (whole or streamed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from paged_engine import RequestOutput
from paged_engine.tokenizer import Tokenizer

from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
    UsageInfo,
)
from .token_bytes import token_bytes

__all__ = ["ChatFormat", "CompletionFormat"]


@dataclass
class _Format:
    """What both formats know: the call's id and model, and how to show logprobs."""

    api_id: str
    model: str
    tokenizer: Tokenizer
    top_logprobs: int | None  # None: no logprobs wanted

    def _token_logprobs(
        self, out: RequestOutput, start: int
    ) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """For each generated token from ``start``: its text, its logprob, and the
        ``top_logprobs`` most likely (text, logprob) pairs, most likely first."""
        tok = self.tokenizer
        rows: list[tuple[str, float, list[tuple[str, float]]]] = []
        for tid, entry in zip(out.token_ids[start:], (out.logprobs or [])[start:], strict=False):
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[: self.top_logprobs or 0]
            rows.append(
                (
                    tok.decode([tid]),
                    float(entry.get(tid, float("-inf"))),
                    [(tok.decode([t]), float(v)) for t, v in ranked],
                )
            )
        return rows

    def _token_ids(self, out: RequestOutput, start: int) -> list[tuple[int, list[int]]]:
        """The ids behind ``_token_logprobs``' rows: each token's and its alternatives'."""
        rows: list[tuple[int, list[int]]] = []
        for tid, entry in zip(out.token_ids[start:], (out.logprobs or [])[start:], strict=False):
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[: self.top_logprobs or 0]
            rows.append((tid, [t for t, _ in ranked]))
        return rows

    def opening(self, num_choices: int) -> Sequence[BaseModel]:
        return []  # what the stream sends before any output

    def _prompt_logprobs(self, out: RequestOutput) -> PromptLogprobs | None:
        """vLLM's ``prompt_logprobs``: per prompt position None (the first, and positions whose
        KV came from the prefix cache) or ``{token id: {logprob, decoded_token}}``."""
        if out.prompt_logprobs is None:
            return None
        return [
            None
            if entry is None
            else {
                str(t): PromptLogprob(logprob=v, decoded_token=self.tokenizer.decode([t]))
                for t, v in entry.items()
            }
            for entry in out.prompt_logprobs
        ]


class CompletionFormat(_Format):
    """``/v1/completions``: ``text_completion`` objects."""

    def _logprobs(self, out: RequestOutput, start: int, offset: int) -> CompletionLogprobs | None:
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

    def response(self, outs: list[RequestOutput], usage: UsageInfo) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=i,
                text=o.text,
                logprobs=self._logprobs(o, 0, 0),
                finish_reason=o.finish_reason,
                prompt_logprobs=self._prompt_logprobs(o),
            )
            for i, o in enumerate(outs)
        ]
        return CompletionResponse(id=self.api_id, model=self.model, choices=choices, usage=usage)

    def chunk(
        self, choice: int, out: RequestOutput, delta: str, first: int
    ) -> CompletionStreamResponse:
        body = CompletionChoice(
            index=choice,
            text=delta,
            logprobs=self._logprobs(out, first, len(out.text) - len(delta)),
            finish_reason=out.finish_reason if out.finished else None,
        )
        return CompletionStreamResponse(id=self.api_id, model=self.model, choices=[body])

    def usage_chunk(self, usage: UsageInfo) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.api_id, model=self.model, choices=[], usage=usage)


class ChatFormat(_Format):
    """``/v1/chat/completions``: ``chat.completion`` objects and ``chat.completion.chunk``s."""

    def _logprobs(self, out: RequestOutput, start: int) -> ChatLogprobs | None:
        if self.top_logprobs is None:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    token=text,
                    logprob=logprob,
                    bytes=list(token_bytes(self.tokenizer, tid)),
                    top_logprobs=[
                        TopLogprob(
                            token=t, logprob=v, bytes=list(token_bytes(self.tokenizer, t_id))
                        )
                        for (t, v), t_id in zip(top, top_ids, strict=True)
                    ],
                )
                for (text, logprob, top), (tid, top_ids) in zip(
                    self._token_logprobs(out, start), self._token_ids(out, start), strict=True
                )
            ]
        )

    def response(self, outs: list[RequestOutput], usage: UsageInfo) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message=ChatResponseMessage(content=o.text),
                logprobs=self._logprobs(o, 0),
                finish_reason=o.finish_reason,
            )
            for i, o in enumerate(outs)
        ]
        return ChatCompletionResponse(
            id=self.api_id,
            model=self.model,
            choices=choices,
            usage=usage,
            prompt_logprobs=self._prompt_logprobs(outs[0]),
        )

    def _chunk(
        self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.api_id, model=self.model, choices=choices, usage=usage)

    def opening(self, num_choices: int) -> list[ChatCompletionChunk]:
        role = DeltaMessage(role="assistant", content="")
        return [self._chunk([ChatStreamChoice(index=k, delta=role)]) for k in range(num_choices)]

    def chunk(self, choice: int, out: RequestOutput, delta: str, first: int) -> ChatCompletionChunk:
        body = ChatStreamChoice(
            index=choice,
            delta=DeltaMessage(content=delta if delta else None),
            logprobs=self._logprobs(out, first),
            finish_reason=out.finish_reason if out.finished else None,
        )
        return self._chunk([body])

    def usage_chunk(self, usage: UsageInfo) -> ChatCompletionChunk:
        return self._chunk([], usage)
