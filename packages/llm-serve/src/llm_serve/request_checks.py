"""Checks of a parsed request against the server's limits, made before anything is queued.

Each raises ``APIError`` naming the field at fault: ``stream_options`` without ``stream``,
a ``max_tokens`` that does not fit in the context after the prompt (``context_length_exceeded``,
as OpenAI and vLLM answer), a request with more choices than the queue can ever hold (400: no
retry can help), and a full queue (429 with ``Retry-After``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .state import ServerSettings

__all__ = [
    "RETRY_AFTER_SECONDS",
    "check_admissible",
    "check_context_length",
    "check_stream_options",
    "queue_full",
]

RETRY_AFTER_SECONDS = 1
"""``Retry-After`` of a 429: the queue moves every step, so a short wait is worth a retry."""


def check_stream_options(req: CompletionRequest | ChatCompletionRequest) -> None:
    """``stream_options`` is only valid with ``stream: true`` (OpenAI answers 400 too)."""
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400,
            "'stream_options' is only allowed when 'stream' is true",
            param="stream_options",
            code="invalid_value",
        )


def check_context_length(
    prompt_lens: Sequence[int],
    values: Mapping[str, tuple[str, Any]],
    context: int,
    what: str,
    cap: bool,
) -> None:
    """Reject an explicit ``max_tokens`` that, added to the longest prompt, exceeds
    ``context`` tokens (unless ``cap``: then the engine stops at the context's end with
    finish ``length``). ``values`` is ``sampling.request_sampling_values`` output; an unset
    ``max_tokens`` always fits (generation stops at the context's end). ``what`` names the
    prompt in the message ("prompt", "messages")."""
    if cap or "max_tokens" not in values:
        return
    name, max_tokens = values["max_tokens"]
    longest = max(prompt_lens)
    if longest + max_tokens > context:
        raise APIError(
            400,
            f"this model's maximum context length is {context} tokens; you requested "
            f"{longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} for the "
            f"completion). Reduce the length of the {what} or '{name}'.",
            param=name,
            code="context_length_exceeded",
        )


def check_admissible(choices: int, n: int, settings: ServerSettings) -> None:
    """A request with more choices (prompts x ``n``) than the waiting queue, or one key's
    share of it, can ever hold gets 400 (a 429 would invite retries that cannot succeed)."""
    limits = [(settings.max_queue, "--max-queue")]
    if settings.max_queue_per_key is not None:
        limits.append((settings.max_queue_per_key, "--max-queue-per-key"))
    for limit, flag in limits:
        if choices > limit:
            raise APIError(
                400,
                f"this request has {choices} choices (prompts x n), more than this server "
                f"ever queues at once ({flag} {limit}); send fewer prompts or a smaller 'n'",
                param="n" if n > 1 else None,
                code="too_many_choices",
            )


def queue_full(message: str) -> APIError:
    """The 429 answered when the queue (or the key's share of it) is full right now."""
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )
