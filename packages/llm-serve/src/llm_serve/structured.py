"""Output constraints of an API request -> ``StructuredOutput``, checked before queueing.

Accepted spellings (at most one per request):

- OpenAI ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``;
- vLLM's extras: ``guided_json`` (a schema), ``guided_regex``, ``guided_choice`` (a list of
  strings), ``guided_grammar`` (EBNF);
- vLLM's ``structured_outputs`` object: one of ``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object: true``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from paged_engine import LLMEngine, SamplingParams, StructuredOutput

from .protocol import APIError, ChatCompletionRequest, CompletionRequest

__all__ = ["check_compiles", "constrain", "request_constraint"]

_STRUCTURED_OUTPUTS_KEYS = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _build(param: str, kind: str, spec: Any) -> StructuredOutput:
    try:
        return StructuredOutput(kind, spec)  # type: ignore[arg-type]
    except ValueError as exc:
        raise _bad(param, f"invalid '{param}': {exc}") from None


def request_constraint(
    req: CompletionRequest | ChatCompletionRequest,
) -> tuple[str, StructuredOutput] | None:
    """``(request field, constraint)`` or None; raises ``APIError(400)`` for a malformed one or
    for more than one."""
    found: list[tuple[str, StructuredOutput]] = []
    rf = req.response_format
    if rf is not None:
        found.extend(_from_response_format(rf))
    for name, kind in (
        ("guided_json", "json_schema"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, name)
        if value is not None:
            found.append((name, _build(name, kind, value)))
    so = req.structured_outputs
    if so:
        set_keys = [k for k, v in so.items() if v is not None and v is not False]
        unknown = [k for k in set_keys if k not in _STRUCTURED_OUTPUTS_KEYS]
        if unknown:
            raise _bad(
                f"structured_outputs.{unknown[0]}",
                f"'structured_outputs.{unknown[0]}' is not supported; use one of "
                f"{', '.join(_STRUCTURED_OUTPUTS_KEYS)}",
            )
        for key in set_keys:
            kind = _STRUCTURED_OUTPUTS_KEYS[key]
            spec = None if kind == "json_object" else so[key]
            found.append(
                (f"structured_outputs.{key}", _build(f"structured_outputs.{key}", kind, spec))
            )
    if len(found) > 1:
        names = ", ".join(f"'{n}'" for n, _ in found)
        raise _bad(found[1][0], f"give at most one output constraint; got {names}")
    return found[0] if found else None


def _from_response_format(rf: dict[str, Any]) -> list[tuple[str, StructuredOutput]]:
    try:
        so = StructuredOutput.from_response_format(rf)
    except ValueError as exc:
        raise _bad("response_format", f"invalid 'response_format': {exc}") from None
    return [] if so is None else [("response_format", so)]


async def check_compiles(
    engine: LLMEngine, param: str, constraint: StructuredOutput, timeout: float
) -> None:
    """Compile ``constraint`` with the engine's grammar cache (the engine then finds it ready);
    ``APIError(400)`` naming ``param`` when it does not compile."""
    future = engine.grammars.submit(constraint)
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
    except ValueError as exc:
        raise _bad(param, str(exc)) from None
    except asyncio.TimeoutError:
        raise APIError(
            504,
            f"'{param}' did not compile within {timeout:g} s",
            type="timeout_error",
            param=param,
        ) from None


async def constrain(
    engine: LLMEngine,
    req: CompletionRequest | ChatCompletionRequest,
    params: SamplingParams,
    forced: tuple[str, StructuredOutput] | None,
    timeout: float,
) -> SamplingParams:
    """``params`` with the request's constraint (or ``forced``, e.g. the tool-call grammar),
    compiled and checked; unchanged when there is none. Raises ``APIError(400)``."""
    found = request_constraint(req)
    if forced is not None and found is not None:
        raise _bad(found[0], f"'{found[0]}' cannot be combined with '{forced[0]}'")
    found = forced or found
    if found is None:
        return params
    param, constraint = found
    await check_compiles(engine, param, constraint, timeout)
    return dataclasses.replace(params, structured_output=constraint)
