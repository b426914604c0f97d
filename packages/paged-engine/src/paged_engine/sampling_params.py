"""Per-request sampling parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MAX_LOGPROBS", "SamplingParams"]

# Most alternatives a request may ask for per position (``logprobs`` / ``prompt_logprobs``);
# OpenAI's API allows 20.
MAX_LOGPROBS = 20


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
    - ``top_k``: keep the k most likely tokens; -1 or 0 = off, other values below 1 are errors.
    - ``top_p`` (in (0, 1], 1 = off): keep the smallest set of most likely tokens whose
      probability reaches ``top_p`` (the most likely token is always kept).
    - ``seed``: when set, the request draws from its own random stream, so its tokens do not
      depend on what else is in the batch; when None it draws from the engine's stream.

    Stopping (finish reason ``stop`` for all three, ``length`` for the limits):

    - end of sequence tokens, unless ``ignore_eos``.
    - ``stop_token_ids``: these tokens end generation (even with ``ignore_eos``). Like end of
      sequence tokens they are in ``token_ids`` but not in the text.
    - ``stop``: a string or a list of strings. Generation ends once the text contains one; it
      may span several tokens. The text is cut before it (kept when
      ``include_stop_str_in_output``); text after it in the same token is dropped. While the
      end of the text could still become a stop string, that part is held back from
      ``RequestOutput.text``, so streamed text never has to be retracted.
    - ``max_tokens`` (>= 1); generation also stops at the engine's ``max_model_len``.

    Reporting:

    - ``logprobs``: None = off; n (0..20) = for every generated token, the log-probabilities of
      the sampled token and of the n most likely tokens.
    - ``prompt_logprobs``: the same for every prompt token after the first (the first has no
      context to be predicted from).

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
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with an actionable message if any field is out of range."""
        _check_int("max_tokens", self.max_tokens, 1, "an integer >= 1")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(
                f"top_p must be in (0, 1] (1 = off; a tiny value keeps only the most likely "
                f"token), got {self.top_p}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer (-1 or 0 = off), got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(
                f"top_k must be -1 or 0 (off) or >= 1 (keep that many tokens), got {self.top_k}"
            )
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off, > 1 discourages repeats), got "
                f"{self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {value}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
                raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
            if any(s == "" for s in self.stop):
                raise ValueError("stop strings must not be empty")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids)
            or any(t < 0 for t in self.stop_token_ids)
        ):
            raise ValueError(
                f"stop_token_ids must be a list of token ids (ints >= 0), got "
                f"{self.stop_token_ids!r}"
            )
        for name in ("include_stop_str_in_output", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, f"None (off) or an integer in [0, {MAX_LOGPROBS}]")
                if value > MAX_LOGPROBS:
                    raise ValueError(
                        f"{name} must be at most {MAX_LOGPROBS} (alternatives per token), got "
                        f"{value}"
                    )

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


def _check_int(name: str, value: object, low: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be {what}, got {value}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
