"""Prepares a step's flattened batch and runs the model once over all scheduled tokens."""

from __future__ import annotations

import torch

import kvquant

from .models.llama import AttentionMetadata, LlamaForCausalLM
from .scheduler import ScheduledSequence

__all__ = ["ModelRunner"]


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
        return torch.tensor(ids, dtype=torch.int64).to(dev), meta

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        """Run the scheduled chunks; return float32 logits ``[S, V]`` for the S chunks that
        complete their sequence (in schedule order). Partial prefill chunks only fill the cache."""
        input_ids, meta = self.prepare(scheduled)
        hidden: torch.Tensor = self.model(input_ids, meta, self.cache)
        last = torch.cumsum(meta.query_lens.to(torch.int64), 0) - 1
        rows = [i for i, s in enumerate(scheduled) if s.completes]
        if not rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        idx = last[torch.tensor(rows, device=last.device)]
        logits = self.model.logits(hidden.index_select(0, idx)).float()
        if self.vocab_limit is not None:
            logits[:, self.vocab_limit :] = float("-inf")
        return logits
