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


def gather_kv(cache: KVCache, layer: int, tables: torch.Tensor, which: str) -> torch.Tensor:
    """De-quantized K or V (``which`` in ``"k"``, ``"v"``) of the blocks ``tables[B, n]``.

    Returns float32 ``[B, n * block_size, num_kv_heads, head_dim]`` in position order (the
    cache's own layout: attention reads it through strides), in the cache's scratch buffer
    ``which``: valid until the next gather of the same name; the caller may modify it.
    """
    data = cache.k[layer] if which == "k" else cache.v[layer]
    sz = cache.k_scale_zero[layer] if which == "k" else cache.v_scale_zero[layer]
    idx = tables.long().reshape(-1)
    b, n = tables.shape
    kvh, length = cache.num_kv_heads, n * cache.block_size
    out = cache.scratch(which, (b, length, kvh, cache.head_dim), torch.float32)
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
    """Dense masked attention of the sequences ``group``, written into ``out``."""
    dev = q.device
    num_heads, head_dim = q.shape[1], q.shape[2]
    kvh = cache.num_kv_heads
    g = num_heads // kvh
    bg = len(group)
    max_q, max_kv = max(q_lens), max(s_lens)
    nblk = -(-max_kv // cache.block_size)
    tables = block_tables[torch.tensor(group, device=dev)][:, :nblk]
    ql = torch.tensor(q_lens, device=dev)
    sl = torch.tensor(s_lens, device=dev)

    length = nblk * cache.block_size
    pos = torch.arange(length, device=dev)
    kv_valid = pos[None, :] < sl[:, None]  # [bg, L]
    kf = gather_kv(cache, layer, tables, "k")  # [bg, L, kvh, D]
    vf = gather_kv(cache, layer, tables, "v")
    # Slots past a sequence's length may hold anything (even NaN): zero them so that masked
    # scores stay -inf and 0 * v stays 0. Only the invalid rows (a sequence's tail) are touched.
    invalid = (~kv_valid).reshape(-1).nonzero().squeeze(1)
    if invalid.numel():
        kf.view(bg * length, kvh, head_dim).index_fill_(0, invalid, 0.0)
        vf.view(bg * length, kvh, head_dim).index_fill_(0, invalid, 0.0)

    i = torch.arange(max_q, device=dev)
    q_valid = i[None, :] < ql[:, None]  # [bg, max_q]
    tok = torch.tensor(starts, device=dev)[:, None] + i[None, :]
    tok = torch.where(q_valid, tok, torch.zeros_like(tok))
    qg = q[tok].to(torch.float32)  # [bg, max_q, H, D]
    qpos = (sl - ql)[:, None] + i[None, :]  # absolute position of each query
    allowed = (pos[None, None, :] <= qpos[:, :, None]) & kv_valid[:, None, :]  # [bg, max_q, L]
    # One fused kernel (scores, mask, softmax, weighted sum); K/V are read through strides.
    # Query head h reads KV head h // g, the GQA layout of `q`.
    o = F.scaled_dot_product_attention(
        qg.transpose(1, 2),
        kf.transpose(1, 2),
        vf.transpose(1, 2),
        attn_mask=allowed[:, None],
        scale=softmax_scale,
        enable_gqa=g > 1,
    ).transpose(1, 2)  # [bg, max_q, H, D]
    out[tok[q_valid]] = o[q_valid].to(out.dtype)
