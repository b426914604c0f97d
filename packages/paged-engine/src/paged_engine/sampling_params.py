"""Per-request sampling parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SamplingParams"]


@dataclass
class SamplingParams:
    """How to pick a request's tokens and when to stop.

    - ``max_tokens``: most tokens to generate (>= 1). Generation also stops at the engine's
      ``max_model_len`` (finish reason ``length`` either way).
    - ``temperature``: 0 means greedy (argmax); otherwise softmax(logits / temperature).
    - ``seed``: when set, the request draws from its own random stream, so its tokens do not
      depend on what else is in the batch; when None it draws from the engine's stream.
    - ``ignore_eos``: keep generating past end-of-sequence tokens.

    Validated on construction and again when a request is added (fields are mutable).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with an actionable message if any field is out of range."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
