"""A request's mutable state while the engine works on it."""

from __future__ import annotations

import enum
import time

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
        self.detokenizer = detokenizer
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

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

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.detokenizer.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.finish_time = time.monotonic()

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_token_ids),
            token_ids=list(self.output_token_ids),
            text=self.detokenizer.text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            error=self.error,
            arrival_time=self.arrival_time,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
            num_cached_tokens=self.num_cached_tokens,
        )
