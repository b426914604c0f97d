"""From OpenAI request fields to ``SamplingParams``, by what the engine actually supports.

Every sampling field of the API is mapped onto the ``SamplingParams`` field of the same meaning.
Whether the engine supports a field is read from ``dataclasses.fields(SamplingParams)`` at call
time, so a field the engine gains later starts working with no change here. A field the engine
lacks is accepted only at its neutral value (the value that changes nothing); anything else is
answered 400 "not supported", never silently ignored.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from paged_engine import LLMEngine, SamplingParams

from .protocol import APIError, ChatCompletionRequest, CompletionRequest

__all__ = [
    "NEUTRAL_VALUES",
    "engine_accepts",
    "request_sampling_values",
    "sampling_params",
    "supported_sampling_fields",
]

# SamplingParams field -> values that mean "off" (sent by clients that fill in defaults).
NEUTRAL_VALUES: Mapping[str, tuple[Any, ...]] = {
    "top_p": (1.0,),
    "top_k": (-1, 0),
    "min_p": (0.0,),
    "presence_penalty": (0.0,),
    "frequency_penalty": (0.0,),
    "repetition_penalty": (1.0,),
    "stop": ([], ""),
    "stop_token_ids": ([],),
    "logprobs": (),
    "ignore_eos": (False,),
    "include_stop_str_in_output": (False,),
}


def supported_sampling_fields() -> frozenset[str]:
    """Names of the fields ``SamplingParams`` has today."""
    return frozenset(f.name for f in dataclasses.fields(SamplingParams))


def engine_accepts(keyword: str) -> bool:
    """Whether ``LLMEngine.add_request`` takes ``keyword`` (e.g. ``cache_salt``)."""
    return keyword in inspect.signature(LLMEngine.add_request).parameters


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
    for name in (
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
    ):
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
    for fields the request leaves unset). Raises ``APIError(400)`` for a field the engine does not
    support set to a non-neutral value, or a value ``SamplingParams`` rejects."""
    supported = supported_sampling_fields()
    kwargs: dict[str, Any] = {}
    for param, value in (defaults or {}).items():
        if param in supported:
            kwargs[param] = value
    for param, (name, value) in values.items():
        if param in supported:
            kwargs[param] = value
        elif not any(value == v for v in NEUTRAL_VALUES.get(param, ())):
            raise APIError(
                400,
                f"'{name}' is not supported by this server's engine yet; leave it unset",
                param=name,
                code="unsupported_parameter",
            )
    try:
        return SamplingParams(**kwargs)
    except (TypeError, ValueError) as exc:
        raise APIError(400, str(exc), code="invalid_value") from None
