"""A request's mutable state while the engine works on it."""

from __future__ import annotations

import enum
import time
from typing import Any

from prefix_index import block_hashes

from .detokenizer import IncrementalDetokenizer
from .outputs import FinishReason, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request: its tokens, its KV blocks and how far the model has computed them.

    ``num_computed_tokens`` counts leading tokens whose K/V are in the cache. The tokens still to
    run are ``token_ids[num_computed_tokens:]``; when a step runs all of them, the last position's
    logits yield the next token. A preempted sequence drops its blocks and resets the count to
    0, so it is recomputed (prompt and generated tokens together) when readmitted.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        arrival_time: float | None = None,
        cache_salt: bytes = b"",
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        # Prefix caching: the tenant namespace, the chained hashes of the full blocks hashed so
        # far (each block hashed once, continuing the chain), how many leading blocks are in the
        # index, whether the request was ever admitted (hits count once), and how often a cache
        # hit was admitted ahead of it (bounds starvation).
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []
        self.num_published_blocks = 0
        self.admitted = False
        self.num_skips = 0
        self.detokenizer = detokenizer
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.error_param: str | None = None
        self.internal_error = False
        # Outputs beyond tokens: the stop token id or string that finished the request, the
        # logprobs asked for, how much text earlier outputs carried (for ``delta_text``).
        self.stop_reason: int | str | None = None
        want_lp = params.logprobs is not None
        self.logprobs: list[dict[int, float]] | None = [] if want_lp else None
        self.cumulative_logprob: float | None = 0.0 if want_lp else None
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        # Logits of every prompt position are needed (prompt_logprobs, or teacher-forced
        # scoring); ``num_prompt_logits`` counts the leading positions already handed out, so a
        # recomputation after preemption does not repeat them.
        self.capture_prompt_logits = False
        self.num_prompt_logits = 0
        self._text_reported = 0
        # Structured output: this request's grammar matcher (an ``xgrammar.GrammarMatcher``),
        # set once its grammar has compiled; it has seen every output token.
        self.grammar: Any = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def hashes_for(self, num_blocks: int, block_size: int) -> list[bytes]:
        """Chained hashes of the first ``num_blocks`` full blocks, computing only new ones."""
        have = len(self.block_hashes)
        if num_blocks > have:
            tokens = self.token_ids[have * block_size : num_blocks * block_size]
            parent = self.block_hashes[-1] if have else None
            self.block_hashes += block_hashes(tokens, block_size, self.cache_salt, parent=parent)
        return self.block_hashes[:num_blocks]

    @property
    def needs_prompt_logits(self) -> bool:
        """True while prompt positions still need their logits computed and handed out (such
        a request must compute its whole prompt, not reuse cached blocks)."""
        wanted = self.params.prompt_logprobs is not None or self.capture_prompt_logits
        return wanted and self.num_prompt_logits < self.num_prompt_tokens - 1

    def append_token(
        self, token_id: int, logprobs: dict[int, float] | None = None, detokenize: bool = True
    ) -> None:
        """Add a generated token (its text unless ``detokenize`` is False: stop tokens are not
        shown) and, when the request asked for them, its logprobs."""
        if self.prompt_logprobs is not None:
            # Prompt positions reused from the prefix cache produced no logits: None.
            self.prompt_logprobs.extend(
                [None] * (self.num_prompt_tokens - len(self.prompt_logprobs))
            )
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        if detokenize:
            self.detokenizer.append(token_id)
        if self.logprobs is not None and logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + logprobs[token_id]
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def finish(
        self,
        reason: FinishReason,
        error: str | None = None,
        *,
        error_param: str | None = None,
        internal_error: bool = False,
    ) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.error_param = error_param
        self.internal_error = internal_error
        self.finish_time = time.monotonic()
        if reason != "error":  # the detokenizer may be what failed
            self.detokenizer.flush()

    def to_output(self) -> RequestOutput:
        """A snapshot for the caller; ``delta_text`` is the text added since the previous call."""
        text = self.detokenizer.text
        delta, self._text_reported = text[self._text_reported :], len(text)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            token_ids=list(self.output_token_ids),
            text=text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            error=self.error,
            error_param=self.error_param,
            internal_error=self.internal_error,
            arrival_time=self.arrival_time,
            first_scheduled_time=self.first_scheduled_time,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
            num_cached_tokens=self.num_cached_tokens,
            delta_text=delta,
            stop_reason=self.stop_reason,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
            cumulative_logprob=self.cumulative_logprob,
        )
