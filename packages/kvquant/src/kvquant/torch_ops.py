"""Vectorized torch implementations of ``write`` and paged ``attention``.

They are the CPU path and the reference the Triton kernels are tested against. Inputs are
assumed validated by :mod:`kvquant.api`; these functions read the small length tensors on the
host (a device sync on a GPU, which is why the GPU path is Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .quantization import quantize, unpack_int4

__all__ = ["attention_torch", "gather_kv", "write_torch"]

# Upper bound on the elements of one group's score tensor (fp32): 2**25 elements = 128 MiB.
# Sequences are attended in groups so a long prefill chunk next to many decode tokens never
# pads every decode token to the chunk's length.
_MAX_GROUP_ELEMENTS = 1 << 25


def write_torch(
    cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter ``k``, ``v`` ``[T, num_kv_heads, head_dim]`` into their slots; -1 is skipped."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    if slot_mapping.numel() == 0:
        return
    kvh = cache.num_kv_heads
    for src, dst, sz_dst in (
        (k, cache.k[layer], cache.k_scale_zero[layer]),
        (v, cache.v[layer], cache.v_scale_zero[layer]),
    ):
        flat = dst.view(-1, kvh, dst.shape[-1])
        if sz_dst is None:
            flat.index_copy_(0, slot_mapping, src.to(cache.dtype))
        else:
            codes, scale_zero = quantize(src.to(cache.dtype), cache.bits)
            flat.index_copy_(0, slot_mapping, codes)
            sz_dst.view(-1, kvh, 2).index_copy_(0, slot_mapping, scale_zero)


def gather_kv(
    cache: KVCache, layer: int, tables: torch.Tensor, which: str, buffer: str | None = None
) -> torch.Tensor:
    """De-quantized K or V (``which`` in ``"k"``, ``"v"``) of the blocks ``tables[B, n]``.

    Returns float32 ``[B, n * block_size, num_kv_heads, head_dim]`` in position order (the
    cache's own layout: attention reads it through strides), in the cache's scratch buffer
    ``buffer`` (default ``which``): valid until the next gather into the same buffer; the
    caller may modify it.
    """
    data = cache.k[layer] if which == "k" else cache.v[layer]
    sz = cache.k_scale_zero[layer] if which == "k" else cache.v_scale_zero[layer]
    idx = tables.long().reshape(-1)
    b, n = tables.shape
    kvh, length = cache.num_kv_heads, n * cache.block_size
    out = cache.scratch(buffer or which, (b, length, kvh, cache.head_dim), torch.float32)
    if sz is None and data.dtype == torch.float32:
        torch.index_select(data, 0, idx, out=out.view(b * n, *data.shape[1:]))
        return out
    codes = data.index_select(0, idx).view(b, length, kvh, data.shape[-1])
    if sz is None:
        return out.copy_(codes)
    q = unpack_int4(codes) if cache.bits == 4 else codes
    scale_zero = sz.index_select(0, idx).view(b, length, kvh, 2).to(torch.float32)
    # x * scale + min, as `dequantize` computes it.
    return out.copy_(q).mul_(scale_zero[..., :1]).add_(scale_zero[..., 1:])


def _groups(
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


def attention_torch(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Causal paged GQA attention for mixed prefill chunks and decode tokens (fp32 math).

    See :func:`kvquant.attention` for the contract. Raises ValueError when the lengths are
    inconsistent (they are on the host here, so checking them costs nothing extra).
    """
    t, num_heads, head_dim = q.shape
    q_lens: list[int] = query_lens.tolist()
    s_lens: list[int] = seq_lens.tolist()
    if sum(q_lens) != t:
        raise ValueError(f"sum(query_lens) = {sum(q_lens)} but q has {t} tokens")
    capacity = block_tables.shape[1] * cache.block_size
    for b, (nq, nk) in enumerate(zip(q_lens, s_lens, strict=True)):
        if not 0 <= nq <= nk <= capacity:
            raise ValueError(
                f"sequence {b}: need 0 <= query_len ({nq}) <= seq_len ({nk}) <= "
                f"block_tables columns x block_size ({capacity})"
            )
    out = torch.zeros_like(q)
    starts = [0]
    for nq in q_lens:
        starts.append(starts[-1] + nq)
    # Decode tokens (one query) are grouped apart so they are not padded to a chunk's length.
    decode = [b for b, nq in enumerate(q_lens) if nq == 1]
    chunks = [b for b, nq in enumerate(q_lens) if nq > 1]
    for seqs in (decode, chunks):
        kv_per_token = 2 * cache.num_kv_heads * head_dim
        for group in _groups(seqs, q_lens, s_lens, num_heads, kv_per_token):
            _attend_group(
                q,
                out,
                cache,
                layer,
                block_tables,
                group,
                [starts[b] for b in group],
                [q_lens[b] for b in group],
                [s_lens[b] for b in group],
                softmax_scale,
            )
    return out


def _attend_group(
    q: torch.Tensor,
    out: torch.Tensor,
    cache: KVCache,
    layer: int,
    block_tables: torch.Tensor,
    group: list[int],
    starts: list[int],
    q_lens: list[int],
    s_lens: list[int],
    softmax_scale: float,
) -> None:
    """Masked attention of the sequences ``group``, written into ``out``: one dense pass over
    each sequence's blocks, or, when they all start with the same cached blocks, the shared
    part read once for all of them."""
    dev = q.device
    max_q, max_kv = max(q_lens), max(s_lens)
    nblk = -(-max_kv // cache.block_size)
    tables = block_tables[torch.tensor(group, device=dev)][:, :nblk]
    ql = torch.tensor(q_lens, device=dev)
    sl = torch.tensor(s_lens, device=dev)

    i = torch.arange(max_q, device=dev)
    q_valid = i[None, :] < ql[:, None]  # [bg, max_q]
    tok = torch.tensor(starts, device=dev)[:, None] + i[None, :]
    tok = torch.where(q_valid, tok, torch.zeros_like(tok))
    qg = q[tok].to(torch.float32)  # [bg, max_q, H, D]
    qpos = (sl - ql)[:, None] + i[None, :]  # absolute position of each query

    shared = _shared_prefix_blocks(tables, q_lens, s_lens, cache.block_size)
    if shared:
        o = _attend_shared_prefix(qg, cache, layer, tables, shared, sl, qpos, softmax_scale)
    else:
        o = _attend_dense(qg, cache, layer, tables, sl, qpos, softmax_scale)
    out[tok[q_valid]] = o[q_valid].to(out.dtype)


def _shared_prefix_blocks(
    tables: torch.Tensor, q_lens: list[int], s_lens: list[int], block_size: int
) -> int:
    """Leading block-table columns that every sequence of the group shares (the same cached
    prefix) and that lie wholly before every query, so every query sees all of them.
    0 when fewer than two sequences or nothing is shared."""
    if tables.shape[0] < 2:
        return 0
    visible = min(nk - nq for nq, nk in zip(q_lens, s_lens, strict=True)) // block_size
    same = (tables[:, :visible] == tables[:1, :visible]).all(dim=0)
    return int(same.long().cumprod(0).sum()) if visible else 0


def _gather_masked(
    cache: KVCache,
    layer: int,
    tables: torch.Tensor,
    first_pos: int,
    sl: torch.Tensor,
    qpos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K, V ``[bg, L, kvh, D]`` of the blocks ``tables`` (which start at absolute position
    ``first_pos``) and the causal mask ``[bg, max_q, L]`` of the queries at ``qpos``.

    Slots past a sequence's length may hold anything (even NaN): they are zeroed so that
    masked scores stay -inf and 0 * v stays 0. Only those rows (a sequence's tail) are touched.
    """
    bg, length = tables.shape[0], tables.shape[1] * cache.block_size
    pos = first_pos + torch.arange(length, device=tables.device)
    kv_valid = pos[None, :] < sl[:, None]  # [bg, L]
    kf = gather_kv(cache, layer, tables, "k")
    vf = gather_kv(cache, layer, tables, "v")
    invalid = (~kv_valid).reshape(-1).nonzero().squeeze(1)
    if invalid.numel():
        kf.view(bg * length, *kf.shape[2:]).index_fill_(0, invalid, 0.0)
        vf.view(bg * length, *vf.shape[2:]).index_fill_(0, invalid, 0.0)
    allowed = (pos[None, None, :] <= qpos[:, :, None]) & kv_valid[:, None, :]
    return kf, vf, allowed


def _attend_dense(
    qg: torch.Tensor,
    cache: KVCache,
    layer: int,
    tables: torch.Tensor,
    sl: torch.Tensor,
    qpos: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Masked attention of ``qg [bg, max_q, H, D]`` over each sequence's own blocks."""
    kf, vf, allowed = _gather_masked(cache, layer, tables, 0, sl, qpos)
    # One fused kernel (scores, mask, softmax, weighted sum); K/V are read through strides.
    # Query head h reads KV head h // g, the GQA layout of `q`.
    return F.scaled_dot_product_attention(
        qg.transpose(1, 2),
        kf.transpose(1, 2),
        vf.transpose(1, 2),
        attn_mask=allowed[:, None],
        scale=softmax_scale,
        enable_gqa=qg.shape[2] > cache.num_kv_heads,
    ).transpose(1, 2)  # [bg, max_q, H, D]


def _attend_shared_prefix(
    qg: torch.Tensor,
    cache: KVCache,
    layer: int,
    tables: torch.Tensor,
    shared: int,
    sl: torch.Tensor,
    qpos: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Attention when the group's sequences share their first ``shared`` blocks (a common
    system prompt): the shared K/V are gathered once and scored against every query in one
    matrix product, instead of once per sequence; each sequence's own blocks are scored as
    usual; one softmax runs over both parts. Same result as :func:`_attend_dense`."""
    bg, max_q, num_heads, head_dim = qg.shape
    kvh = cache.num_kv_heads
    g = num_heads // kvh
    bs = cache.block_size
    ls = shared * bs
    rows = max_q * g
    # [kvh, bg, max_q * g, D]: rows are (query, head of the group) pairs.
    qh = (
        qg.view(bg, max_q, kvh, g, head_dim).permute(2, 0, 1, 3, 4).reshape(kvh, bg, rows, head_dim)
    )

    ks = gather_kv(cache, layer, tables[:1, :shared], "k", "shared k")[0]  # [Ls, kvh, D]
    vs = gather_kv(cache, layer, tables[:1, :shared], "v", "shared v")[0]
    s_shared = torch.matmul(qh.reshape(kvh, bg * rows, head_dim), ks.permute(1, 2, 0))

    kf, vf, allowed = _gather_masked(cache, layer, tables[:, shared:], ls, sl, qpos)
    length = kf.shape[1]
    s_own = torch.matmul(qh, kf.permute(2, 0, 3, 1))  # [kvh, bg, rows, L]
    s_own.view(kvh, bg, max_q, g, length).masked_fill_(~allowed[None, :, :, None, :], float("-inf"))

    scores = torch.cat([s_shared.view(kvh, bg, rows, ls), s_own], dim=-1).mul_(softmax_scale)
    probs = torch.softmax(scores, dim=-1)
    o = torch.matmul(probs[..., :ls].reshape(kvh, bg * rows, ls), vs.transpose(0, 1))
    o = o.view(kvh, bg, rows, head_dim) + torch.matmul(probs[..., ls:], vf.permute(2, 0, 1, 3))
    return (
        o.view(kvh, bg, max_q, g, head_dim)
        .permute(1, 2, 0, 3, 4)
        .reshape(bg, max_q, num_heads, head_dim)
    )
