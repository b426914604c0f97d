"""Prepares a step's flattened batch and runs the model once over all scheduled tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import kvquant

from .models.llama import AttentionMetadata, LlamaForCausalLM
from .scheduler import ScheduledSequence

__all__ = ["ModelRunner", "StepLogits"]


class ModelRunner:
    """Owns the model and the KV cache; one ``execute`` per engine step.

    The batch is the concatenation of every scheduled chunk, in schedule order; index
    arithmetic is vectorized (no per-token Python loops), only the gathering of token ids and
    block lists walks the sequences.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        cache: kvquant.KVCache,
        block_size: int,
        device: torch.device,
        vocab_limit: int | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.device = device
        self.vocab_limit = vocab_limit

    def prepare(self, scheduled: list[ScheduledSequence]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Token ids ``[T]`` and attention metadata for the scheduled chunks."""
        ids: list[int] = []
        starts: list[int] = []
        qlens: list[int] = []
        tables: list[list[int]] = []
        for s in scheduled:
            c = s.seq.num_computed_tokens
            ids.extend(s.seq.token_ids[c : c + s.num_tokens])
            starts.append(c)
            qlens.append(s.num_tokens)
            tables.append(s.seq.block_ids)
        width = max(len(t) for t in tables)
        # Pad rows with a valid block id (0); kernels never read past a sequence's length.
        padded = [t + [0] * (width - len(t)) for t in tables]
        bs = self.block_size
        q = torch.tensor(qlens, dtype=torch.int64)
        start = torch.tensor(starts, dtype=torch.int64)
        block_tables = torch.tensor(padded, dtype=torch.int64)
        seq_idx = torch.repeat_interleave(torch.arange(len(scheduled)), q)
        first = torch.cumsum(q, 0) - q
        positions = start[seq_idx] + (torch.arange(int(q.sum())) - first[seq_idx])
        slots = block_tables[seq_idx, positions // bs] * bs + positions % bs
        dev = self.device
        meta = AttentionMetadata(
            positions=positions.to(dev),
            slot_mapping=slots.to(dev),
            block_tables=block_tables.to(torch.int32).to(dev),
            seq_lens=(start + q).to(torch.int32).to(dev),
            query_lens=q.to(torch.int32).to(dev),
        )
        # Everything attention derives from the batch layout, once for all layers.
        meta.plan = kvquant.plan_for(
            self.cache, meta.block_tables, meta.seq_lens, meta.query_lens, self.model.config.num_heads
        )
        return torch.tensor(ids, dtype=torch.int64).to(dev), meta

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> StepLogits:
        """Run the scheduled chunks.

        Returns float32 logits ``[S, V]`` of the last position of the S chunks that complete
        their sequence (in schedule order; partial prefill chunks only fill the cache), and for
        each chunk of a sequence that ``needs_prompt_logits``, the logits of its prompt
        positions not yet handed out (see :class:`StepLogits`).
        """
        input_ids, meta = self.prepare(scheduled)
        hidden: torch.Tensor = self.model(input_ids, meta, self.cache)
        qlens = meta.query_lens.to(torch.int64)
        first = torch.cumsum(qlens, 0) - qlens
        rows = [i for i, s in enumerate(scheduled) if s.completes]
        if rows:
            idx = (first + qlens - 1)[torch.tensor(rows, device=first.device)]
            logits = self._logits(hidden.index_select(0, idx))
        else:
            logits = hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        prompt: dict[int, tuple[int, torch.Tensor]] = {}
        for i, s in enumerate(scheduled):
            seq = s.seq
            if not seq.needs_prompt_logits:
                continue
            c = seq.num_computed_tokens
            lo = max(c, seq.num_prompt_logits)
            hi = min(c + s.num_tokens, seq.num_prompt_tokens - 1)
            if lo < hi:
                at = int(first[i]) + lo - c
                prompt[i] = (lo, self._logits(hidden[at : at + hi - lo]))
        return StepLogits(logits, prompt)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(hidden).float()
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit :] = float("-inf")
        return logits


@dataclass
class StepLogits:
    """What a step's forward pass yields.

    ``sample``: ``[S, V]`` float32 logits of the last position of each chunk that completes its
    sequence, in schedule order (a token is sampled from each row).
    ``prompt``: scheduled index -> ``(start, logits [m, V])`` for chunks of sequences that need
    prompt logits: positions ``start .. start + m - 1`` of the sequence, where position ``p``'s
    logits predict prompt token ``p + 1``; only positions below ``num_prompt_tokens - 1`` that
    were not handed out before (``Sequence.num_prompt_logits``), so after a preemption nothing
    is repeated. Raw logits (beyond-vocabulary ids masked to ``-inf``).
    """

    sample: torch.Tensor
    prompt: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
