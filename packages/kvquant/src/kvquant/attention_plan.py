"""The part of the torch attention path that depends only on a step's lengths and block tables.

A model runs attention once per layer over the same batch layout, so everything derived from
``block_tables`` / ``seq_lens`` / ``query_lens`` (the grouping of sequences, gather indices,
masks, the shared-prefix split) is computed once by :func:`plan_attention` and reused by every
layer (:func:`kvquant.attention` takes it as ``plan=``). Nothing is cached inside kvquant: the
caller owns the plan and drops it after the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionPlan", "GroupPlan", "plan_attention"]

# Upper bound on the elements of one group's score tensor (fp32): 2**25 elements = 128 MiB.
# Sequences are attended in groups so a long prefill chunk next to many decode tokens never
# pads every decode token to the chunk's length.
_MAX_GROUP_ELEMENTS = 1 << 25


@dataclass
class GroupPlan:
    """Sequences attended together, padded to ``max_q`` queries and ``length`` keys.

    ``tok``: ``[bg, max_q]`` row of ``q`` for each (sequence, query), 0 where padded;
    ``q_valid``: ``[bg, max_q]`` which of those are real; ``out_rows``: ``tok[q_valid]``.
    ``shared_slots``: ``[Ls]`` cache slots of the leading blocks every sequence of the group
    shares and every query sees (None when nothing is shared); ``slots``: ``[bg, length]``
    cache slots of each sequence's remaining keys (positions ``first_pos ..``), padded with
    slot 0; ``invalid``: flat indices into ``[bg * length]`` of padded keys (zeroed after the
    gather, so garbage in unused slots never reaches the output); ``mask``: ``[bg, max_q,
    length]`` bool, True where a query may attend to a key, or None when every query sees
    every key (a single decode token over its whole sequence) or when ``causal``: one
    sequence whose queries are all its tokens (a fresh prefill), where the fused kernel's own
    causal masking applies (and skips the masked half of the work).
    ``open_keys``: flat indices into ``[bg * length]`` of the keys in each sequence's last
    block when it is partial, and ``open_slots`` their cache slots (None when every block is
    full): a block-channel cache reads those keys exactly, from the block's residual.
    """

    tok: torch.Tensor
    q_valid: torch.Tensor
    out_rows: torch.Tensor
    max_q: int
    shared_slots: torch.Tensor | None
    slots: torch.Tensor
    first_pos: int
    invalid: torch.Tensor | None
    mask: torch.Tensor | None
    causal: bool = False
    open_keys: torch.Tensor | None = None
    open_slots: torch.Tensor | None = None


@dataclass
class AttentionPlan:
    """A step's attention layout for the torch path: groups of sequences and, when one group
    covers every token of ``q`` in order (a decode batch, a single prefill), ``in_order`` so
    the output needs no scatter."""

    num_tokens: int
    groups: list[GroupPlan]
    in_order: bool


def plan_attention(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    block_size: int,
    num_heads: int,
    kv_bytes_per_token: int,
) -> AttentionPlan:
    """Plan the torch attention of one step (see the module docs).

    Args are those of :func:`kvquant.attention` (on any device; the plan's tensors are on
    ``block_tables``' device), plus the cache's ``block_size``, the query heads and the
    elements one token's de-quantized K and V take (``2 * num_kv_heads * head_dim``), which
    bound the size of a group.

    Raises:
        ValueError: inconsistent lengths (read on the host once here, not in every layer).
    """
    q_lens: list[int] = query_lens.tolist()
    s_lens: list[int] = seq_lens.tolist()
    capacity = block_tables.shape[1] * block_size
    for b, (nq, nk) in enumerate(zip(q_lens, s_lens, strict=True)):
        if not 0 <= nq <= nk <= capacity:
            raise ValueError(
                f"sequence {b}: need 0 <= query_len ({nq}) <= seq_len ({nk}) <= "
                f"block_tables columns x block_size ({capacity})"
            )
    starts = [0]
    for nq in q_lens:
        starts.append(starts[-1] + nq)
    # Decode tokens (one query) are grouped apart so they are not padded to a chunk's length.
    decode = [b for b, nq in enumerate(q_lens) if nq == 1]
    chunks = [b for b, nq in enumerate(q_lens) if nq > 1]
    groups: list[GroupPlan] = []
    for seqs in (decode, chunks):
        for group in _split(seqs, q_lens, s_lens, num_heads, kv_bytes_per_token):
            groups.append(
                _plan_group(
                    block_tables,
                    block_size,
                    [starts[b] for b in group],
                    [q_lens[b] for b in group],
                    [s_lens[b] for b in group],
                    group,
                )
            )
    total = starts[-1]
    # No padded queries (bg * max_q == total) and rows in order: o.view(q.shape) is the output.
    in_order = len(groups) == 1 and groups[0].tok.numel() == total
    if in_order:
        rows = groups[0].out_rows
        in_order = bool((rows == torch.arange(total, device=rows.device)).all())
    return AttentionPlan(total, groups, in_order)


def _split(
    seqs: list[int], q_lens: list[int], s_lens: list[int], num_heads: int, kv_per_token: int
) -> list[list[int]]:
    """Split ``seqs`` (batch order) into runs whose padded score tensors stay bounded."""
    groups: list[list[int]] = []
    cur: list[int] = []
    max_q = max_kv = 0
    for b in seqs:
        nq, nk = max(max_q, q_lens[b]), max(max_kv, s_lens[b])
        # Scores (one per head, query, key) or de-quantized K and V, whichever is larger.
        size = (len(cur) + 1) * max(num_heads * nq * nk, nk * kv_per_token)
        if cur and size > _MAX_GROUP_ELEMENTS:
            groups.append(cur)
            cur, nq, nk = [], q_lens[b], s_lens[b]
        cur.append(b)
        max_q, max_kv = nq, nk
    if cur:
        groups.append(cur)
    return groups


def _plan_group(
    block_tables: torch.Tensor,
    block_size: int,
    starts: list[int],
    q_lens: list[int],
    s_lens: list[int],
    group: list[int],
) -> GroupPlan:
    dev = block_tables.device
    max_q, max_kv = max(q_lens), max(s_lens)
    nblk = -(-max_kv // block_size)
    tables = block_tables[torch.tensor(group, device=dev)][:, :nblk].long()
    ql = torch.tensor(q_lens, device=dev)
    sl = torch.tensor(s_lens, device=dev)

    i = torch.arange(max_q, device=dev)
    q_valid = i[None, :] < ql[:, None]
    tok = torch.tensor(starts, device=dev)[:, None] + i[None, :]
    tok = torch.where(q_valid, tok, torch.zeros_like(tok))
    qpos = (sl - ql)[:, None] + i[None, :]  # absolute position of each query

    shared = _shared_prefix_blocks(tables, q_lens, s_lens, block_size)
    first_pos = shared * block_size
    shared_slots = None
    if shared:
        shared_slots = _slots(tables[:1, :shared], block_size, shared * block_size)[0]
    # Keys are gathered slot by slot up to the longest sequence (not whole blocks), so a lone
    # sequence needs no padding at all.
    length = max_kv - first_pos
    slots = _slots(tables[:, shared:], block_size, length)
    pos = first_pos + torch.arange(length, device=dev)
    kv_valid = pos[None, :] < sl[:, None]  # [bg, L]
    invalid_flat = (~kv_valid).reshape(-1).nonzero().squeeze(1)
    invalid = invalid_flat if invalid_flat.numel() else None
    mask: torch.Tensor | None = (pos[None, None, :] <= qpos[:, :, None]) & kv_valid[:, None, :]
    causal = len(group) == 1 and q_lens[0] == s_lens[0] and max_q > 1
    if (max_q == 1 and invalid is None) or causal:
        mask = None  # one query per sequence, at its last position: it sees every key
    # Keys of a sequence's open (partial) last block: positions from its last block boundary.
    is_open = kv_valid & (pos[None, :] >= (sl // block_size * block_size)[:, None])
    open_flat = is_open.reshape(-1).nonzero().squeeze(1)
    open_keys = open_flat if open_flat.numel() else None
    open_slots = slots.reshape(-1)[open_flat] if open_keys is not None else None
    return GroupPlan(
        tok=tok,
        q_valid=q_valid,
        out_rows=tok[q_valid],
        max_q=max_q,
        shared_slots=shared_slots,
        slots=slots,
        first_pos=first_pos,
        invalid=invalid,
        mask=mask,
        causal=causal,
        open_keys=open_keys,
        open_slots=open_slots,
    )


def _slots(tables: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """``[rows, length]`` cache slots of the first ``length`` positions of each row's blocks."""
    pos = torch.arange(length, device=tables.device)
    return tables[:, pos // block_size] * block_size + pos % block_size


def _shared_prefix_blocks(
    tables: torch.Tensor, q_lens: list[int], s_lens: list[int], block_size: int
) -> int:
    """Leading block-table columns that every sequence of the group shares (the same cached
    prefix) and that lie wholly before every query, so every query sees all of them.
    0 when fewer than two sequences or nothing is shared."""
    if tables.shape[0] < 2:
        return 0
    visible = min(nk - nq for nq, nk in zip(q_lens, s_lens, strict=True)) // block_size
    if not visible:
        return 0
    same = (tables[:, :visible] == tables[:1, :visible]).all(dim=0)
    return int(same.long().cumprod(0).sum())
