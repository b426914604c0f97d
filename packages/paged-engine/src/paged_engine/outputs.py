"""What the engine returns: per-request outputs and engine-wide statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["EngineStats", "FinishReason", "RequestOutput"]

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class RequestOutput:
    """A snapshot of one request after a step.

    ``token_ids`` and ``text`` are cumulative (everything generated so far). ``text`` only ever
    grows by appending (a later output's text starts with an earlier one's), so a streaming
    caller can send ``delta_text``, the text added since this request's previous output; text
    that may still turn out to be part of a stop string, or an incomplete multi-byte character,
    is held back until it is certain. ``finish_reason`` is set once ``finished``: ``stop`` (an
    end-of-sequence token, a ``stop_token_ids`` token or a ``stop`` string; ``stop_reason``
    holds the stop token id or string, None for end of sequence), ``length`` (``max_tokens``
    or ``max_model_len``), ``abort``, or ``error`` (then ``error`` says why, ``error_param``
    names the offending request field when there is one, and ``internal_error`` is True when
    the engine failed, not the request). Times are
    ``time.monotonic()`` seconds; ``first_scheduled_time`` (first admitted to a step; queue time
    is this minus ``arrival_time``), ``first_token_time`` and ``finish_time`` are None until they
    happen.

    Log-probabilities (when the request's ``SamplingParams`` ask for them) are those of the
    model's raw distribution, before penalties, temperature and filters. ``logprobs`` has one
    dict per generated token: token id -> logprob, the generated token first, then the
    ``logprobs`` most likely tokens in descending order (the generated token is not repeated).
    ``prompt_logprobs`` has one entry per prompt token: None for the first (nothing predicts
    it), then the same kind of dict with the prompt token first. ``cumulative_logprob`` is the
    sum of the generated tokens' logprobs.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_param: str | None = None
    internal_error: bool = False
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_cached_tokens: int = 0
    delta_text: str = ""
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    cumulative_logprob: float | None = None


@dataclass
class EngineStats:
    """Engine-wide counters at one moment.

    Every KV block is exactly one of free, cached (held only by a cache, reusable) or used (owned
    by a request): ``num_blocks_total == num_blocks_free + num_blocks_cached + num_blocks_used``.
    ``kv_usage`` is ``num_blocks_used / num_blocks_total`` (blocks held by requests: cached
    blocks are reclaimable and do not count). Prefix-cache tokens are counted once per request,
    at its first admission: ``prefix_cache_hit_rate`` = hit tokens / queried (prompt) tokens.
    ``num_evictions`` / ``num_expirations`` count cached blocks dropped for room or by the TTL.
    Disk tier (zero when off): ``disk_hit_tokens`` prompt tokens loaded from disk (they also
    count in ``prefix_cache_hit_tokens``), ``disk_blocks`` / ``disk_bytes`` stored now,
    ``disk_spills`` blocks written, ``disk_spill_drops`` spills dropped (writer queue full),
    ``disk_load_seconds`` time spent loading.
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
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    num_evictions: int = 0
    num_expirations: int = 0
    disk_hit_tokens: int = 0
    disk_blocks: int = 0
    disk_bytes: int = 0
    disk_spills: int = 0
    disk_spill_drops: int = 0
    disk_load_seconds: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0
