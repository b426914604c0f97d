"""Vectorized torch implementations of ``write`` and paged ``attention``.

They are the CPU path and the reference the Triton kernels are tested against. Inputs are
assumed validated by :mod:`kvquant.api`; these functions read the small length tensors on the
host (a device sync on a GPU, which is why the GPU path is Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_plan import AttentionPlan, GroupPlan
from .kv_cache import KVCache
from .quantization import quantize, quantize_channels

__all__ = ["attention_torch", "gather_kv", "gather_slots", "overlay_residual", "write_torch"]


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
    pairs = [
        (k, cache.k[layer], cache.k_scale_zero[layer]),
        (v, cache.v[layer], cache.v_scale_zero[layer]),
    ]
    if cache.block_channel:
        _write_keys_block_channel(cache, layer, k.to(cache.dtype), slot_mapping)
        pairs = pairs[1:]
    for src, dst, sz_dst in pairs:
        flat = dst.view(-1, kvh, dst.shape[-1])
        if sz_dst is None:
            flat.index_copy_(0, slot_mapping, src.to(cache.dtype))
        else:
            codes, scale_zero = quantize(src.to(cache.dtype), cache.bits)
            flat.index_copy_(0, slot_mapping, codes)
            sz_dst.view(-1, kvh, 2).index_copy_(0, slot_mapping, scale_zero)


def _write_keys_block_channel(
    cache: KVCache, layer: int, k: torch.Tensor, slots: torch.Tensor
) -> None:
    """Block-channel keys: every block whose last slot is written here is quantized whole
    (its earlier tokens read from its residual slot, the rest from ``k``); the other tokens go
    to their block's residual slot. Sealing comes first: a sequence's next, partial block may
    reuse the residual slot of the block it just filled.

    Raises:
        ValueError: a token of a block left partial whose block has no residual slot.
    """
    bs = cache.block_size
    blocks, offs = slots // bs, slots % bs
    residual, rmap = cache.k_residual[layer], cache.residual_map
    filled = torch.unique(blocks[offs == bs - 1])  # sorted
    in_filled = torch.isin(blocks, filled)
    if filled.numel():
        rs = rmap[filled].long()
        stage = torch.zeros(
            filled.numel(),
            bs,
            cache.num_kv_heads,
            cache.head_dim,
            dtype=cache.dtype,
            device=k.device,
        )
        has = rs >= 0
        stage[has] = residual[rs[has]]
        pos = torch.searchsorted(filled, blocks[in_filled])
        stage[pos, offs[in_filled]] = k[in_filled]
        codes, scale_zero = quantize_channels(stage)
        cache.k[layer].index_copy_(0, filled, codes)
        sz = cache.k_scale_zero[layer]
        assert sz is not None
        sz.index_copy_(0, filled, scale_zero)
    rest = ~in_filled
    if bool(rest.any()):
        rs = rmap[blocks[rest]].long()
        if bool((rs < 0).any()):
            bad = sorted(set(blocks[rest][rs < 0].tolist()))
            raise ValueError(
                f"blocks {bad[:5]} are left partial but have no residual slot: call "
                "cache.assign_residual(block_ids, slots) before writing into them"
            )
        residual[rs, offs[rest]] = k[rest]


def overlay_residual(
    cache: KVCache, layer: int, kf: torch.Tensor, open_keys: torch.Tensor, open_slots: torch.Tensor
) -> None:
    """Block-channel keys: replace the gathered keys ``kf`` at the flat key indices
    ``open_keys`` (keys of each sequence's last, partial block) with their exact values from
    the residual slot of their block (``open_slots``: their cache slots)."""
    bs = cache.block_size
    rows = cache.residual_map[open_slots // bs].long() * bs + open_slots % bs
    exact = cache.k_residual[layer].view(-1, cache.num_kv_heads, cache.head_dim)[rows]
    kf.view(-1, cache.num_kv_heads, cache.head_dim)[open_keys] = exact.to(kf.dtype)


def gather_kv(
    cache: KVCache, layer: int, tables: torch.Tensor, which: str, buffer: str | None = None
) -> torch.Tensor:
    """De-quantized K or V (``which`` in ``"k"``, ``"v"``) of the blocks ``tables[B, n]``.

    Returns float32 ``[B, n * block_size, num_kv_heads, head_dim]`` in position order, in the
    cache's scratch buffer ``buffer`` (default ``which``): valid until the next gather into the
    same buffer; the caller may modify it.
    """
    b, n = tables.shape
    bs = cache.block_size
    slots = (tables.long()[:, :, None] * bs + torch.arange(bs, device=tables.device)).view(
        b, n * bs
    )
    return gather_slots(cache, layer, slots, which, buffer)


def gather_slots(
    cache: KVCache,
    layer: int,
    slots: torch.Tensor,
    which: str,
    buffer: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """De-quantized K or V (``which`` in ``"k"``, ``"v"``) of the cache slots ``slots[...]``
    (int64), as ``dtype`` (float32, or the cache's own dtype for bits 0) ``[*slots.shape,
    num_kv_heads, head_dim]`` in the cache's scratch buffer ``buffer`` (default ``which``;
    valid until the next gather into it)."""
    data = cache.k[layer] if which == "k" else cache.v[layer]
    sz = cache.k_scale_zero[layer] if which == "k" else cache.v_scale_zero[layer]
    kvh = cache.num_kv_heads
    idx = slots.reshape(-1)
    name = (buffer or which) + ("" if dtype == torch.float32 else f" {dtype}")  # no churn
    out = cache.scratch(name, (*slots.shape, kvh, cache.head_dim), dtype)
    flat = data.view(-1, kvh, data.shape[-1])
    if sz is None and data.dtype == dtype:
        torch.index_select(flat, 0, idx, out=out.view(-1, kvh, cache.head_dim))
        return out
    codes = flat.index_select(0, idx).view(*slots.shape, kvh, data.shape[-1])
    if sz is None:
        return out.copy_(codes)
    if which == "k" and cache.block_channel:
        # One (scale, min) per block, head and channel: each slot reads its block's.
        blocks = idx // cache.block_size
        shape = (*slots.shape, kvh, cache.head_dim)
        scale = sz[..., 0].index_select(0, blocks).view(shape).to(torch.float32)
        low = sz[..., 1].index_select(0, blocks).view(shape).to(torch.float32)
    else:
        scale_zero = sz.view(-1, kvh, 2).index_select(0, idx).view(*slots.shape, kvh, 2)
        scale, low = scale_zero[..., :1].contiguous(), scale_zero[..., 1:].contiguous()
    _dequantize_into(out, codes, scale, low, cache.bits)
    return out


def _dequantize_into(
    out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int
) -> None:
    """``out = q * scale + min`` (as ``dequantize``; ``scale`` and ``low`` broadcast to ``out``)
    of uint8 ``codes``: nibbles are unpacked straight into the output's halves and the affine
    map is one fused pass, about 3x faster on a CPU than unpack, copy, multiply, add."""
    if bits == 4:
        half = codes.shape[-1]
        out[..., :half].copy_(codes & 0xF)
        out[..., half:].copy_(codes >> 4)
    else:
        out.copy_(codes)
    torch.addcmul(low, out, scale, out=out)


def attention_torch(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    plan: AttentionPlan,
    softmax_scale: float,
) -> torch.Tensor:
    """Causal paged GQA attention for mixed prefill chunks and decode tokens (fp32 math), laid
    out by ``plan`` (see :func:`kvquant.plan_attention`); see :func:`kvquant.attention` for the
    contract."""
    if plan.num_tokens != q.shape[0]:
        raise ValueError(f"sum(query_lens) = {plan.num_tokens} but q has {q.shape[0]} tokens")
    if plan.in_order:
        group = plan.groups[0]
        o = _attend_group(q, cache, layer, group, softmax_scale, in_order=True)
        return o.reshape(q.shape).to(q.dtype)
    out = torch.zeros_like(q)
    for group in plan.groups:
        o = _attend_group(q, cache, layer, group, softmax_scale)
        out[group.out_rows] = o[group.q_valid].to(out.dtype)
    return out


def _attend_group(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    group: GroupPlan,
    softmax_scale: float,
    in_order: bool = False,
) -> torch.Tensor:
    """Masked attention of one group: ``[bg, max_q, H, D]``. One dense pass over each
    sequence's keys, or, when they all start with the same cached blocks, the shared part read
    once for all of them. Math in float32, except that for decode rows an unquantized cache in
    ``q``'s dtype feeds the fused kernel as it is (it accumulates in float32 itself)."""
    bg, max_q = group.tok.shape
    if in_order:  # the group's queries are q's rows in order
        qg = q.reshape(bg, max_q, *q.shape[1:])
    else:
        qg = q.index_select(0, group.tok.reshape(-1)).view(bg, max_q, *q.shape[1:])
    # Decode rows only: the fused kernel is slower in bfloat16 than in float32 on prefill
    # chunks on CPU, where the conversion is cheap next to the work.
    native = cache.bits == 0 and cache.dtype == q.dtype and max_q == 1
    native = native and group.shared_slots is None
    dtype = q.dtype if native else torch.float32
    qg = qg.to(dtype)
    kf, vf = _gather_own(cache, layer, group, dtype)
    if group.shared_slots is not None:
        return _attend_shared_prefix(qg, cache, layer, group, kf, vf, softmax_scale)
    # One fused kernel (scores, mask, softmax, weighted sum); K/V are read through strides.
    # Query head h reads KV head h // g, the GQA layout of `q`.
    return F.scaled_dot_product_attention(
        qg.transpose(1, 2),
        kf.transpose(1, 2),
        vf.transpose(1, 2),
        attn_mask=None if group.mask is None else group.mask[:, None],
        is_causal=group.causal,
        scale=softmax_scale,
        enable_gqa=qg.shape[2] > cache.num_kv_heads,
    ).transpose(1, 2)


def _gather_own(
    cache: KVCache, layer: int, group: GroupPlan, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V ``[bg, L, kvh, D]`` of the group's own keys. Slots past a sequence's length may
    hold anything (even NaN): they are zeroed so that masked scores stay -inf and 0 * v
    stays 0."""
    kf = gather_slots(cache, layer, group.slots, "k", dtype=dtype)
    if cache.block_channel and group.open_keys is not None:
        # A sequence's open last block: its exact keys, not the codes.
        assert group.open_slots is not None
        overlay_residual(cache, layer, kf, group.open_keys, group.open_slots)
    vf = gather_slots(cache, layer, group.slots, "v", dtype=dtype)
    if group.invalid is not None:
        kf.view(-1, *kf.shape[2:]).index_fill_(0, group.invalid, 0.0)
        vf.view(-1, *vf.shape[2:]).index_fill_(0, group.invalid, 0.0)
    return kf, vf


def _attend_shared_prefix(
    qg: torch.Tensor,
    cache: KVCache,
    layer: int,
    group: GroupPlan,
    kf: torch.Tensor,
    vf: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Attention when the group's sequences share their first blocks (a common system prompt):
    the shared K/V are gathered once and scored against every query in one matrix product,
    instead of once per sequence; each sequence's own keys are scored as usual; one softmax
    runs over both parts. Same result as the dense path."""
    assert group.shared_slots is not None
    bg, max_q, num_heads, head_dim = qg.shape
    kvh = cache.num_kv_heads
    g = num_heads // kvh
    ls = group.shared_slots.shape[0]
    rows = max_q * g
    # [kvh, bg, max_q * g, D]: rows are (query, head of the group) pairs.
    qh = (
        qg.view(bg, max_q, kvh, g, head_dim).permute(2, 0, 1, 3, 4).reshape(kvh, bg, rows, head_dim)
    )
    ks = gather_slots(cache, layer, group.shared_slots, "k", "shared k")  # [Ls, kvh, D]
    vs = gather_slots(cache, layer, group.shared_slots, "v", "shared v")
    s_shared = torch.matmul(qh.reshape(kvh, bg * rows, head_dim), ks.permute(1, 2, 0))

    length = kf.shape[1]
    s_own = torch.matmul(qh, kf.permute(2, 0, 3, 1))  # [kvh, bg, rows, L]
    if group.mask is not None:
        s_own.view(kvh, bg, max_q, g, length).masked_fill_(
            ~group.mask[None, :, :, None, :], float("-inf")
        )

    scores = torch.cat([s_shared.view(kvh, bg, rows, ls), s_own], dim=-1).mul_(softmax_scale)
    probs = torch.softmax(scores, dim=-1)
    o = torch.matmul(probs[..., :ls].reshape(kvh, bg * rows, ls), vs.transpose(0, 1))
    o = o.view(kvh, bg, rows, head_dim) + torch.matmul(probs[..., ls:], vf.permute(2, 0, 1, 3))
    return (
        o.view(kvh, bg, max_q, g, head_dim)
        .permute(1, 2, 0, 3, 4)
        .reshape(bg, max_q, num_heads, head_dim)
    )
