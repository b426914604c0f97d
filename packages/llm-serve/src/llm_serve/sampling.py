"""From OpenAI request fields to ``SamplingParams``.

Every sampling field of the API maps onto the ``SamplingParams`` field of the same meaning;
``SamplingParams`` validates the values (a bad one is a 400 naming it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from paged_engine import ParamError, SamplingParams

from .protocol import APIError, ChatCompletionRequest, CompletionRequest

__all__ = ["request_sampling_values", "sampling_params"]

# Request fields that are ``SamplingParams`` fields of the same name and meaning.
_SAME_NAMES = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "ignore_eos",
    "include_stop_str_in_output",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stop_token_ids",
    "min_tokens",
    "skip_special_tokens",
    "prompt_logprobs",
]


def request_sampling_values(
    req: CompletionRequest | ChatCompletionRequest,
) -> dict[str, tuple[str, Any]]:
    """The request's sampling settings as ``{SamplingParams field: (request field, value)}``,
    translated to the engine's conventions; fields the request leaves unset are absent."""
    out: dict[str, tuple[str, Any]] = {}

    def put(param: str, name: str, value: Any) -> None:
        if value is not None:
            out[param] = (name, value)

    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        put("max_tokens", "max_completion_tokens", req.max_completion_tokens)
    else:
        put("max_tokens", "max_tokens", req.max_tokens)
    for name in _SAME_NAMES:
        put(name, name, getattr(req, name))
    stop = req.stop
    if isinstance(stop, str):
        stop = [stop] if stop else []
    put("stop", "stop", stop)
    if isinstance(req, ChatCompletionRequest):
        if req.logprobs:
            put("logprobs", "logprobs", req.top_logprobs or 0)
        elif req.top_logprobs:
            raise APIError(400, "'top_logprobs' requires 'logprobs': true", param="top_logprobs")
    else:
        put("logprobs", "logprobs", req.logprobs)
    return out


def sampling_params(
    values: Mapping[str, tuple[str, Any]], defaults: Mapping[str, Any] | None = None
) -> SamplingParams:
    """Build ``SamplingParams`` from ``request_sampling_values`` output plus ``defaults`` (used
    for fields the request leaves unset). Raises ``APIError(400)`` for a value
    ``SamplingParams`` rejects."""
    kwargs = {**(defaults or {}), **{param: value for param, (_, value) in values.items()}}
    try:
        return SamplingParams(**kwargs)
    except ParamError as exc:  # named by the request's own field name
        name = values.get(exc.param, (exc.param,))[0]
        raise APIError(400, str(exc), param=name, code="invalid_value") from None
    except (TypeError, ValueError) as exc:
        raise APIError(400, str(exc), code="invalid_value") from None
