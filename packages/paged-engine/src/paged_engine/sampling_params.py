"""Per-request sampling parameters."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass
from typing import Any

from .structured_output import StructuredOutput

__all__ = [
    "MAX_INT32",
    "MAX_LOGPROBS",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "MAX_STOP_TOKEN_IDS",
    "SEED_MAX",
    "SEED_MIN",
    "ParamError",
    "SamplingParams",
]

# Most alternatives a request may ask for per position (``logprobs`` / ``prompt_logprobs``);
# OpenAI's API allows 20.
MAX_LOGPROBS = 20
# Stop strings are checked against the text after every token, so their number and length
# bound the per-token work (OpenAI allows 4 strings; these leave room for real prompts).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
# Integer fields are bounded so that they fit the tensors the sampler builds from them.
MAX_INT32 = 2**31 - 1
# Seeds: any signed or unsigned 64-bit integer (OpenAI's and vLLM's ``seed`` is int64; the
# unsigned half leaves room for a server deriving ``seed + j`` for choice j).
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


class ParamError(ValueError):
    """A request parameter out of range; ``param`` names the field (as the OpenAI API's error
    object does)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick a request's tokens, what to report about them, and when to stop.

    Defaults are vLLM's; every default leaves sampling unchanged.

    Choosing tokens (applied in this order to the model's logits; see ``Sampler``):

    - penalties, on the raw logits: ``repetition_penalty`` (> 0, 1 = off) divides a positive
      logit and multiplies a negative one, for every token seen in the prompt or the output;
      ``frequency_penalty`` (in [-2, 2], 0 = off) subtracts ``value * count`` for each token's
      count in the output so far; ``presence_penalty`` (in [-2, 2], 0 = off) subtracts
      ``value`` once for every token present in the output. Greedy requests are penalized too.
    - ``temperature``: 0 means greedy (argmax, and the filters below are moot); otherwise the
      logits are divided by it.
    - ``min_p`` (in [0, 1], 0 = off): drop tokens whose probability is below ``min_p`` times
      the most likely token's.
    - ``top_k``: keep the k most likely tokens (at most 2**31 - 1; more than the vocabulary
      keeps all); -1 or 0 = off, other values below 1 are errors.
    - ``top_p`` (in (0, 1], 1 = off): keep the smallest set of most likely tokens whose
      probability reaches ``top_p`` (the most likely token is always kept).
    - ``seed`` (an integer in [-2**63, 2**64 - 1]): when set, the request draws from its own
      random stream, so its tokens do not depend on what else is in the batch; when None it
      draws from the engine's stream. The seed is hashed before seeding the stream, so seeds
      that differ only in their high bits (equal mod 2**32) still give different streams.

    Stopping (finish reason ``stop`` for all three, ``length`` for the limits):

    - end of sequence tokens, unless ``ignore_eos``.
    - ``stop_token_ids`` (at most ``MAX_STOP_TOKEN_IDS``): these tokens end generation (even with ``ignore_eos``). Like end of
      sequence tokens they are in ``token_ids`` but not in the text.
    - ``stop``: a string or a list of at most 16 non-empty strings of at most 256
      characters each (``MAX_STOP_STRINGS``, ``MAX_STOP_STRING_CHARS``). Generation ends once the text contains one; it
      may span several tokens. The text is cut before it (kept when
      ``include_stop_str_in_output``); text after it in the same token is dropped. While the
      end of the text could still become a stop string, that part is held back from
      ``RequestOutput.text``, so streamed text never has to be retracted.
    - ``max_tokens`` (in [1, 2**31 - 1]); generation also stops at the engine's ``max_model_len``.
    - ``min_tokens`` (in [0, ``max_tokens``]): until that many tokens are generated, end of
      sequence and stop tokens are never sampled and stop strings do not end generation.

    Constraining (``structured_output``, None = off): a ``StructuredOutput`` (JSON schema, any
    JSON object, regex, choice among strings, EBNF grammar); or, as LMDeploy spells it,
    ``response_format={"type": "json_schema", "json_schema": {"name": ..., "schema": ...}}``. Before the steps above, tokens the
    constraint does not allow next are masked out, so penalties, temperature and the filters act
    on the allowed tokens only. The request finishes (``stop``) when the constraint is complete
    and the model emits an end-of-sequence token, or when the constraint allows nothing more
    (even with ``ignore_eos``); ``max_tokens`` may still cut it short (``length``). A constraint
    that does not compile, or that leaves no allowed token, finishes the request with
    ``error``. For constrained requests ``logprobs`` are those of the masked distribution.

    Reporting:

    - ``logprobs``: None = off; n (0..20) = for every generated token, the log-probabilities of
      the sampled token and of the n most likely tokens.
    - ``prompt_logprobs``: the same for every prompt token after the first (the first has no
      context to be predicted from).
    - ``skip_special_tokens`` (True): leave special tokens (e.g. ``<|im_end|>``) out of the text.

    Log-probabilities are those of the model's raw distribution (log-softmax of its logits,
    before penalties, temperature and filters), as vLLM reports by default.

    Validated on construction and again when a request is added (fields are mutable). A
    ``stop`` string is normalized to a one-element list.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_output: StructuredOutput | None = None
    # LMDeploy's spelling of the constraint (init only): a ``response_format`` dict, see
    # ``StructuredOutput.from_response_format``; it sets ``structured_output``.
    response_format: InitVar[dict[str, Any] | None] = None

    def __post_init__(self, response_format: dict[str, Any] | None) -> None:
        if response_format is not None:
            if self.structured_output is not None:
                raise ParamError(
                    "response_format", "give structured_output or response_format, not both"
                )
            try:
                self.structured_output = StructuredOutput.from_response_format(response_format)
            except ValueError as exc:
                raise ParamError("response_format", str(exc)) from None
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ``ParamError`` (a ValueError naming the field) with an actionable message if
        any field is out of range."""
        _check_int("max_tokens", self.max_tokens, 1, f"an integer in [1, {MAX_INT32}]", MAX_INT32)
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ParamError(
                "temperature", f"temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ParamError(
                "top_p",
                f"top_p must be in (0, 1] (1 = off; a tiny value keeps only the most likely "
                f"token), got {self.top_p}",
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ParamError(
                "top_k", f"top_k must be an integer (-1 or 0 = off), got {self.top_k!r}"
            )
        if not -1 <= self.top_k <= MAX_INT32:
            raise ParamError(
                "top_k",
                f"top_k must be -1 or 0 (off) or in [1, {MAX_INT32}] (keep that many tokens), "
                f"got {self.top_k}",
            )
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ParamError("min_p", f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ParamError(
                "repetition_penalty",
                f"repetition_penalty must be > 0 (1 = off, > 1 discourages repeats), got "
                f"{self.repetition_penalty}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise ParamError(name, f"{name} must be in [-2, 2] (0 = off), got {value}")
        if self.seed is not None:
            _check_int(
                "seed", self.seed, SEED_MIN, "None or an integer in [-2**63, 2**64 - 1]", SEED_MAX
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
                raise ParamError(
                    "stop", f"stop must be a string or a list of strings, got {self.stop!r}"
                )
            if len(self.stop) > MAX_STOP_STRINGS:
                raise ParamError(
                    "stop",
                    f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed",
                )
            if any(s == "" for s in self.stop):
                raise ParamError("stop", "stop strings must not be empty")
            longest = max((len(s) for s in self.stop), default=0)
            if longest > MAX_STOP_STRING_CHARS:
                raise ParamError(
                    "stop",
                    f"a stop string has {longest} characters; at most {MAX_STOP_STRING_CHARS} "
                    f"are allowed",
                )
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids)
            or any(t < 0 for t in self.stop_token_ids)
        ):
            raise ParamError(
                "stop_token_ids",
                f"stop_token_ids must be a list of token ids (ints >= 0), got "
                f"{self.stop_token_ids!r}",
            )
        if self.stop_token_ids is not None and len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ParamError(
                "stop_token_ids",
                f"stop_token_ids holds {len(self.stop_token_ids)} ids; at most "
                f"{MAX_STOP_TOKEN_IDS} are allowed",
            )
        _check_int("min_tokens", self.min_tokens, 0, "an integer in [0, max_tokens]")
        if self.min_tokens > self.max_tokens:
            raise ParamError(
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            )
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, f"None (off) or an integer in [0, {MAX_LOGPROBS}]")
                if value > MAX_LOGPROBS:
                    raise ParamError(
                        name,
                        f"{name} must be at most {MAX_LOGPROBS} (alternatives per token), got "
                        f"{value}",
                    )
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise ParamError(
                    "structured_output",
                    f"structured_output must be a StructuredOutput or None, got "
                    f"{type(self.structured_output).__name__}",
                )
            try:
                self.structured_output.validate()
            except ValueError as exc:
                raise ParamError("structured_output", str(exc)) from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings (empty when none)."""
        return list(self.stop) if self.stop else []

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


def _check_int(name: str, value: object, low: int, what: str, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be {what}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ParamError(name, f"{name} must be {what}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParamError(name, f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ParamError(name, f"{name} must be finite, got {value}")
