"""OpenAI-compatible request and response bodies, and the OpenAI error body.

Requests are parsed strictly from JSON (``"10"`` is not an integer, ``true`` is not a number);
ranges are checked here so every violation becomes a 400 naming the offending field. Fields of
the OpenAI API this server does not implement land in ``model_extra`` and are checked by
``unsupported_fields``: null or empty values (and each field's documented default) pass,
anything else is rejected rather than ignored.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from .limits import (
    MAX_INT32,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SEED_MAX,
    SEED_MIN,
)

__all__ = [
    "APIError",
    "ChatChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ChatStreamChoice",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "CompletionStreamResponse",
    "DeltaFunctionCall",
    "DeltaMessage",
    "DeltaToolCall",
    "DetokenizeRequest",
    "ErrorBody",
    "ErrorResponse",
    "FunctionCall",
    "FunctionDefinition",
    "ModelCard",
    "ModelList",
    "PromptTokensDetails",
    "TokenizeRequest",
    "ToolCall",
    "ToolDefinition",
    "UsageInfo",
    "parse_request",
    "unsupported_fields",
]

_M = TypeVar("_M", bound="BaseModel")


# -- errors ---------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


class APIError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers  # extra response headers, e.g. Retry-After on a 429

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        )


def parse_request(model: type[_M], raw: bytes) -> _M:
    """Parse a JSON body into ``model``; raises ``APIError(400)`` naming the first bad field."""
    try:
        return model.model_validate_json(raw or b"", strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = errors[0]
        if err["type"] in ("json_invalid", "json_type"):
            raise APIError(400, _json_error_message(err["msg"]), code="invalid_json") from None
        # A field that takes one of several shapes (``stop``: a string or a list) fails once
        # per shape; the error that got deepest into the value says what is wrong with it.
        err = max(
            errors, key=lambda e: (len(_field_path(e["loc"])), not e["type"].endswith("_type"))
        )
        loc = _param_name(_field_path(err["loc"]))
        if not loc:
            raise APIError(400, f"the request body must be a JSON object: {err['msg']}") from None
        kind = "missing_required_parameter" if err["type"] == "missing" else "invalid_value"
        if err["type"] == "missing":
            msg = f"'{loc}' is required"
        else:
            msg = f"invalid value for '{loc}': {err['msg']}"
            if "input" in err and not isinstance(err["input"], (dict, list)):
                shown = repr(err["input"])
                msg += f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
        raise APIError(400, msg, param=loc, code=kind) from None


def _field_path(loc: tuple[int | str, ...]) -> list[int | str]:
    """``loc`` without the tags pydantic adds for the members of a union (``str``,
    ``list[str]``, ``constrained-str``): field names and list indices only."""
    return [p for p in loc if isinstance(p, int) or not ("[" in p or "-" in p or p in _UNION_TAGS)]


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_name(path: list[int | str]) -> str:
    """``['messages', 0, 'role']`` -> ``messages[0].role``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _json_error_message(msg: str) -> str:
    """A readable message for a JSON syntax error; a lone UTF-16 surrogate escape (such as
    ``"\\ud800"`` without its pair) is named as such, not as a truncated escape."""
    if "hex escape" in msg or "surrogate" in msg:
        where = re.search(r"line \d+ column \d+", msg)
        return (
            "the request body is not valid JSON: a \\u escape"
            + (f" at {where.group(0)}" if where else "")
            + " is an unpaired UTF-16 surrogate (\\ud800-\\udfff must come as a high-low "
            "pair); such a string is not text"
        )
    return f"the request body is not valid JSON: {msg}"


# -- requests -------------------------------------------------------------------------------------


class _Request(BaseModel):
    # Infinity and NaN (which Python's JSON accepts) are not numbers any field can take.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


_StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
_TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]


class StreamOptions(_Request):
    include_usage: bool | None = None


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class _ChatTemplateFields(_Request):
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_options(self) -> dict[str, Any]:
        """``LLMEngine.chat_prompt`` keywords: the generation prompt is added unless the last
        message is continued (or ``add_generation_prompt`` says otherwise)."""
        agp = self.add_generation_prompt
        return {
            "add_generation_prompt": not self.continue_final_message if agp is None else agp,
            "continue_final_message": bool(self.continue_final_message),
            "chat_template_kwargs": self.chat_template_kwargs,
        }


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Request):
    """An entry of ``tools``: a function the model may call."""

    type: Literal["function"]
    function: FunctionDefinition


class _SamplingFields(_Request):
    """Fields shared by both endpoints; each maps onto ``SamplingParams`` (see sampling.py).
    The output constraints (``response_format``, vLLM's ``guided_*`` and ``structured_outputs``)
    are read by structured.py."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT32)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]
        | Annotated[list[_StopString], Field(max_length=MAX_STOP_STRINGS)]
        | None
    ) = None
    stop_token_ids: Annotated[list[_TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    priority: int | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings, a list of token ids,
    or a list of token-id lists (a batch: choice ``i * n + j`` is prompt i's j-th sample)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)


class ChatCompletionRequest(_SamplingFields, _ChatTemplateFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_ChatTemplateFields):
    """``POST /tokenize``: a ``prompt``, or chat ``messages`` put through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: str | None = None
    tokens: list[int]


# Documented defaults of OpenAI fields we do not implement: sending them is not using them.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    # Chat implements the tool fields; on /v1/completions only their defaults pass.
    "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True,),
    "store": (False,),
    "logit_bias": ({},),
    "echo": (False,),
    "use_beam_search": (False,),
}


def _is_empty(value: Any) -> bool:
    return value is None or value in ("", [], {})


def unsupported_fields(obj: BaseModel, prefix: str = "") -> list[str]:
    """Names (dotted paths) of fields set to a non-empty, non-default value that this server
    does not implement: unknown extra fields of ``obj`` and of its nested request objects."""
    names: list[str] = []
    for name, value in (obj.model_extra or {}).items():
        if _is_empty(value) or any(value == v for v in _NEUTRAL.get(name, ())):
            continue
        names.append(prefix + name)
    for name in type(obj).model_fields:
        value = getattr(obj, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, _Request):
                where = f"{name}[{i}]" if isinstance(value, list) else name
                names.extend(unsupported_fields(item, f"{prefix}{where}."))
    return names


# -- responses ------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


def _now() -> int:
    return int(time.time())


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's entry of ``prompt_logprobs`` (one dict per prompt position, keyed by token id)."""

    logprob: float
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(CompletionResponse):
    usage: UsageInfo | None = None  # type: ignore[assignment]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class _DropNone(BaseModel):
    """Unset parts are left out of the JSON (as OpenAI does in stream deltas)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class DeltaFunctionCall(_DropNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropNone):
    """A piece of tool call ``index``: the first carries id, type and name; later ones append
    to ``function.arguments``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(BaseModel):
    """A streamed chat delta; unset parts are left out of the JSON (as OpenAI does)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "llm-serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
