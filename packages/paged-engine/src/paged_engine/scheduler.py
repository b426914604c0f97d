"""Continuous batching: which sequences run in the next step, and how many tokens each."""

from __future__ import annotations

import contextlib
import itertools
import time
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
    and is recomputed later, mostly from the prefix cache), repeating until the chunk fits or
    the sequence preempts itself. Then, if nothing was preempted, waiting sequences are admitted
    while the batch has room (``max_batch_size``), budget remains and their first chunk's blocks
    fit; a sequence that does not fit stops admission (nobody overtakes it for lack of room).

    With a prefix index in the pool, admission first reuses the longest cached chain of the
    sequence's tokens (at most ``(len - 1) // block_size`` blocks, so the last token is always
    computed for its logits); cached tokens cost no budget. Requests whose cached fraction is at
    least ``prefix_match_threshold`` are tried first; one passed over ``MAX_SKIPS`` times goes
    first, so nothing starves. A request whose next uncached block a running sequence is
    computing right now waits for it to be published instead of computing it again.

    A lone sequence always fits: the engine caps every sequence at the pool's capacity, so the
    oldest running sequence can always make progress by preempting the others.
    """

    MAX_SKIPS = 8
    ADMISSION_WINDOW = 256  # waiting sequences looked at per step: bounds the cost of a long queue

    def __init__(
        self,
        block_pool: BlockPool,
        max_batch_size: int,
        max_num_batched_tokens: int,
        prefix_match_threshold: float = 0.0,
    ) -> None:
        self.pool = block_pool
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_match_threshold = prefix_match_threshold
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Prompt tokens looked up in, and found in, the prefix cache: once per request.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

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
        seq.num_published_blocks = 0
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

        if not out.preempted and self.waiting:
            self._admit(out, budget)
        return out

    # -- admission ------------------------------------------------------------------------------

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        bs = self.pool.block_size
        arrival = list(itertools.islice(self.waiting, self.ADMISSION_WINDOW))
        order = self._admission_order(arrival)
        inflight = self._inflight_hashes()
        admitted: set[int] = set()
        for seq in order:
            if budget <= 0 or len(self.running) >= self.max_batch_size:
                break
            handles: list[int] = []
            reusable: list[bytes] = []
            # Prompt logprobs need the logits of every prompt position: such a request computes
            # its whole prompt (and still publishes its blocks for others).
            if self.pool.caching and not seq.needs_prompt_logits:
                reusable = seq.hashes_for((len(seq) - 1) // bs, bs)
                handles = self.pool.cached_blocks(seq.token_ids, seq.cache_salt, reusable)
                if len(handles) < len(reusable) and reusable[len(handles)] in inflight:
                    continue  # a running sequence computes this block now: reuse it next step
            cached = len(handles) * bs
            n = min(len(seq) - cached, budget)
            need = self.pool.blocks_for(cached + n) - len(handles)
            # Reusing an unreferenced cached block takes it out of what allocation may evict.
            pinned = sum(1 for h in handles if self.pool.ref_count(h) == 0)
            if need + pinned > self.pool.num_available():
                break
            seq.block_ids = self.pool.reuse(seq.token_ids, seq.cache_salt, reusable[: len(handles)])
            seq.num_published_blocks = len(handles)
            seq.num_computed_tokens = cached
            if not seq.admitted:
                seq.admitted = True
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = cached
                self.num_queried_tokens += seq.num_prompt_tokens
                self.num_hit_tokens += cached
            self.waiting.remove(seq)
            self._grow(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, n))
            inflight.update(self._pending_hashes(seq))
            admitted.add(id(seq))
            budget -= n
        if admitted:
            # Whoever arrived before an admitted request but was not admitted was passed over.
            last = max(i for i, s in enumerate(arrival) if id(s) in admitted)
            for s in arrival[:last]:
                if id(s) not in admitted:
                    s.num_skips += 1

    def _admission_order(self, window: list[Sequence]) -> list[Sequence]:
        """Waiting sequences to try, best first: preempted and starving ones, then cache hits
        (cached fraction >= ``prefix_match_threshold``), then the rest; arrival order within
        each group, for the first ``ADMISSION_WINDOW`` waiting sequences (``window``)."""
        if not self.pool.caching or self.prefix_match_threshold <= 0:
            return window
        bs = self.pool.block_size
        ranks: dict[int, int] = {}
        for seq in window:
            if seq.admitted or seq.num_skips >= self.MAX_SKIPS:
                ranks[id(seq)] = 0
                continue
            # By hash alone: a ranking heuristic, cheap for a long queue (reuse is verified).
            cached = self.pool.peek(seq.hashes_for((len(seq) - 1) // bs, bs), seq.cache_salt)
            ranks[id(seq)] = 1 if cached >= self.prefix_match_threshold * len(seq) else 2
        return sorted(window, key=lambda s: ranks[id(s)])  # stable: keeps arrival order

    def _pending_hashes(self, seq: Sequence) -> list[bytes]:
        """Hashes of the full blocks of ``seq`` not yet published (to be computed)."""
        bs = self.pool.block_size
        return seq.hashes_for(len(seq) // bs, bs)[seq.num_published_blocks :]

    def _inflight_hashes(self) -> set[bytes]:
        """Blocks that running prefills are computing and have not published yet."""
        out: set[bytes] = set()
        if self.pool.caching:
            for seq in self.running:
                if seq.num_computed_tokens < seq.num_prompt_tokens:
                    out.update(self._pending_hashes(seq))
        return out

    def computed(self, scheduled: list[ScheduledSequence]) -> None:
        """Record that a step computed the scheduled chunks, and offer each sequence's newly
        completed full blocks to the prefix cache."""
        bs = self.pool.block_size
        for s in scheduled:
            seq = s.seq
            seq.num_computed_tokens += s.num_tokens
            full = seq.num_computed_tokens // bs
            if self.pool.caching and full > seq.num_published_blocks:
                hashes = seq.hashes_for(full, bs)
                seq.block_ids = self.pool.publish(
                    seq.block_ids, seq.token_ids, seq.cache_salt, hashes
                )
                seq.num_published_blocks = full

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
