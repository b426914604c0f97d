"""Residual slots for the block-channel int4 key layout: where a sequence's open block keeps
its exact keys until the block fills and is quantized."""

from __future__ import annotations

from collections.abc import Iterable

import kvquant

from .scheduler import ScheduledSequence
from .sequence import Sequence

__all__ = ["ResidualSlots"]


class ResidualSlots:
    """One residual slot per running sequence whose last block is partial.

    Before each forward pass, :meth:`assign` points the block each scheduled chunk leaves
    partial at its sequence's slot (``kvquant.KVCache.assign_residual``). A sequence keeps its
    slot while it runs, so the block it is filling and the next one share it: within one write,
    kvquant quantizes the block that fills (reading the slot) before storing the new partial
    block's keys (overwriting it). A slot goes back to the free list as soon as its sequence is
    no longer running (finished, aborted or preempted): a preempted sequence is recomputed from
    a block boundary, so it never needs its old residual. Full blocks never read a residual, so
    publishing them to the prefix cache shares only quantized blocks.
    """

    def __init__(self, cache: kvquant.KVCache) -> None:
        if not cache.block_channel:
            raise ValueError("residual slots are for a block-channel int4 cache")
        self.cache = cache
        self._free = list(range(cache.residual_slots - 1, -1, -1))
        self._held: dict[Sequence, int] = {}

    @property
    def num_held(self) -> int:
        return len(self._held)

    def slot_of(self, seq: Sequence) -> int | None:
        """The residual slot ``seq`` holds, or None."""
        return self._held.get(seq)

    def assign(self, scheduled: list[ScheduledSequence], running: Iterable[Sequence]) -> None:
        """Free the slots of sequences no longer ``running``, then give each scheduled chunk
        that ends inside a block a slot for that block.

        Raises:
            RuntimeError: more sequences need a slot than the cache has (the cache must have
                one per sequence the scheduler may run at once).
        """
        live = set(running)
        for seq in [s for s in self._held if s not in live]:
            self._free.append(self._held.pop(seq))
        bs = self.cache.block_size
        blocks: list[int] = []
        slots: list[int] = []
        for s in scheduled:
            end = s.seq.num_computed_tokens + s.num_tokens
            if end % bs == 0:
                continue
            slot = self._held.get(s.seq)
            if slot is None:
                if not self._free:
                    raise RuntimeError(
                        f"all {self.cache.residual_slots} KV residual slots are in use: the "
                        "cache needs one per sequence the scheduler may run at once"
                    )
                slot = self._held[s.seq] = self._free.pop()
            blocks.append(s.seq.block_ids[(end - 1) // bs])
            slots.append(slot)
        self.cache.assign_residual(blocks, slots)
