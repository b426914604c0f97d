"""What the engine returns: per-request outputs and engine-wide statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["EngineStats", "FinishReason", "RequestOutput"]

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class RequestOutput:
    """A snapshot of one request after a step.

    ``token_ids`` and ``text`` are cumulative (everything generated so far). ``finish_reason`` is
    set once ``finished``: ``stop`` (an end-of-sequence token), ``length`` (``max_tokens`` or
    ``max_model_len``), ``abort``, or ``error`` (then ``error`` says why). Times are
    ``time.monotonic()`` seconds; ``first_token_time`` / ``finish_time`` are None until they happen.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class EngineStats:
    """Engine-wide counters at one moment.

    Every KV block is exactly one of free, cached (held only by a cache, reusable) or used (owned
    by a request): ``num_blocks_total == num_blocks_free + num_blocks_cached + num_blocks_used``.
    ``kv_usage`` is ``num_blocks_used / num_blocks_total``.
    """

    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_cached: int
    kv_usage: float
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_finished: int
    prompt_tokens_total: int
    generation_tokens_total: int
