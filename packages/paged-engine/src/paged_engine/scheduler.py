"""Continuous batching: which sequences run in the next step, and how many tokens each."""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

from .block_pool import BlockPool
from .sequence import Sequence, SequenceStatus

__all__ = ["ScheduledSequence", "Scheduler", "SchedulerOutput"]


@dataclass
class ScheduledSequence:
    """A sequence and the number of its uncomputed tokens to run this step (its chunk)."""

    seq: Sequence
    num_tokens: int

    @property
    def completes(self) -> bool:
        """True when the chunk reaches the sequence's last token, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    """Packs decode tokens and prefill chunks into one step.

    Each step: running sequences first, oldest first, each taking ``min(uncomputed tokens,
    remaining budget)`` tokens (a decode is a chunk of one; a prompt longer than the budget is
    prefilled over several steps). When the pool cannot hold a chunk's K/V, the newest running
    sequence is preempted (its blocks released; it goes back to the front of the waiting queue
    and is recomputed later), repeating until the chunk fits or the sequence preempts itself.
    Then, if nothing was preempted, waiting sequences are admitted in arrival order while the
    batch has room (``max_batch_size``), budget remains and their first chunk's blocks fit.

    A lone sequence always fits: the engine caps every sequence at the pool's capacity, so the
    oldest running sequence can always make progress by preempting the others.
    """

    def __init__(
        self, block_pool: BlockPool, max_batch_size: int, max_num_batched_tokens: int
    ) -> None:
        self.pool = block_pool
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(
            0, self.pool.blocks_for(seq.num_computed_tokens + num_tokens) - len(seq.block_ids)
        )

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        need = self._blocks_needed(seq, num_tokens)
        if need:
            seq.block_ids.extend(self.pool.allocate(need))

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.block_ids)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        # Preempted sequences are older than anything waiting: they go first.
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            preempted_self = False
            while not self.pool.can_allocate(self._blocks_needed(seq, n)):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    preempted_self = True
                    break
            if preempted_self:
                break
            self._grow(seq, n)
            out.scheduled.append(ScheduledSequence(seq, n))
            budget -= n
            i += 1

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
                seq = self.waiting[0]
                n = min(seq.num_uncomputed_tokens, budget)
                if not self.pool.can_allocate(self._blocks_needed(seq, n)):
                    break
                self.waiting.popleft()
                self._grow(seq, n)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSequence(seq, n))
                budget -= n
        return out

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        self.pool.release(seq.block_ids)
        seq.block_ids = []

    def find(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None
