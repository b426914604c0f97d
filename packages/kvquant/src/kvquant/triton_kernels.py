"""Triton kernels: quantize-on-write, dequantize, and paged attention over the quantized cache.

Written to compile for a GPU and to run under the Triton interpreter (``TRITON_INTERPRET=1``)
on the CPU, which forgives what the compiler refuses. Hence, throughout:

- every block shape is a power of two and ragged edges are masked;
- ``tl.dot`` operands are at least 16 in every dimension: the GQA group of query heads that
  share a KV head is padded up to 16 rows (several query tokens times the padded group);
- only ``tl.exp2`` (no libdevice); bfloat16 loads are cast to float32 before any arithmetic;
- 4-bit codes are unpacked with shifts and masks. Channel ``d`` sits in the low nibble and
  ``d + D/2`` in the high nibble, so the two nibbles are two contiguous halves of the head:
  attention does ``q_lo . k_lo + q_hi . k_hi`` and never interleaves.

Quantization matches :mod:`kvquant.quantization`: scale and min are rounded to their storage
dtype first and the codes computed against the stored values (a code may still differ by one
from torch where float32 division rounds differently on a rounding edge).

The entry points take validated inputs (see :mod:`kvquant.api`) and never read device values
on the host, so they do not synchronize the GPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from .kv_cache import KVCache
from .launch import attention_launch, dequantize_launch, pow2, seal_launch, write_launch
from .quantization import EPS, code_dim, qmax, scale_zero_dtype

__all__ = [
    "Launch",
    "attention_launches",
    "attention_triton",
    "dequantize_launches",
    "dequantize_triton",
    "quantize_launches",
    "quantize_triton",
    "write_launches",
    "write_triton",
]

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}


def _jit(*dynamic: str) -> Callable[[Callable[..., object]], Any]:
    """``triton.jit`` (compiled, or interpreted under TRITON_INTERPRET=1), typed for mypy.

    Kernel parameters are annotated ``tl.tensor`` (pointers and runtime scalars) or
    ``tl.constexpr``; Triton only specializes on annotations naming a dtype, so ``tl.tensor``
    changes nothing at launch. ``dynamic`` names integer parameters that change from step to
    step or model to model (batch size, KV heads, ...): Triton would otherwise compile a
    variant for the value 1 and for multiples of 16.
    """

    def wrap(fn: Callable[..., object]) -> Any:
        return triton.jit(fn, do_not_specialize=list(dynamic))

    return wrap


@dataclass(frozen=True)
class Launch:
    """One kernel launch, built apart from running it so :mod:`kvquant.aot` can compile it."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)  # constexprs, num_warps, num_stages

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------
# quantize / write
# --------------------------------------------------------------------------------------------

EPS_VALUE = tl.constexpr(EPS)


@_jit()
def _quantize_tile(
    x_lo: tl.tensor,
    x_hi: tl.tensor,
    mask_lo: tl.tensor,
    mask_hi: tl.tensor,
    BITS: tl.constexpr,
    SZ_DTYPE: tl.constexpr,
) -> Any:
    """Codes and stored (scale, min) of rows ``[x_lo | x_hi]`` (``x_hi`` unused for bits 8)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    mn = tl.min(tl.where(mask_lo, x_lo, float("inf")), axis=1)
    mx = tl.max(tl.where(mask_lo, x_lo, float("-inf")), axis=1)
    if BITS == 4:
        mn = tl.minimum(mn, tl.min(tl.where(mask_hi, x_hi, float("inf")), axis=1))
        mx = tl.maximum(mx, tl.max(tl.where(mask_hi, x_hi, float("-inf")), axis=1))
    scale = tl.maximum((mx - mn) / QMAX, EPS_VALUE)
    # Round scale and min to their storage dtype first: codes are computed against the
    # values a reader will see.
    scale_s = scale.to(SZ_DTYPE).to(tl.float32)
    mn_s = mn.to(SZ_DTYPE).to(tl.float32)
    # Clamped to [0, QMAX] before the cast, so truncation equals floor.
    q_lo = tl.minimum(tl.maximum((x_lo - mn_s[:, None]) / scale_s[:, None] + 0.5, 0.0), QMAX)
    codes = q_lo.to(tl.int32)
    if BITS == 4:
        q_hi = tl.minimum(tl.maximum((x_hi - mn_s[:, None]) / scale_s[:, None] + 0.5, 0.0), QMAX)
        codes = codes | (q_hi.to(tl.int32) << 4)
    return codes.to(tl.uint8), scale_s, mn_s


@_jit("num_heads")
def _write_kernel(
    x_ptr: tl.tensor,  # [T, H, D] source values (last dim contiguous)
    slot_ptr: tl.tensor,  # int64 [T] destination row groups; unused when not HAS_SLOTS
    codes_ptr: tl.tensor,  # [rows, H, DC] destination (uint8 codes, or values for bits 0)
    sz_ptr: tl.tensor,  # [rows, H, 2] destination (scale, min); unused for bits 0
    stride_xt: tl.tensor,
    stride_xh: tl.tensor,
    num_heads: tl.tensor,
    D: tl.constexpr,
    BITS: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,  # power of two >= the stored width DC
) -> None:
    """One program per (token, ``BLOCK_H`` heads): head ``h`` of token ``t`` goes to row
    ``slot[t]`` (or ``t``)."""
    t = tl.program_id(0).to(tl.int64)
    row = t
    if HAS_SLOTS:
        row = tl.load(slot_ptr + t)
    if row < 0:  # padding token
        return
    H = num_heads
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    DC: tl.constexpr = D // 2 if BITS == 4 else D
    mask = (h[:, None] < H) & (c[None, :] < DC)
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh + c[None, :]
    dst_row = row * H + h  # int64: the cache can exceed 2**31 elements
    dst = codes_ptr + dst_row[:, None] * DC + c[None, :]
    if BITS == 0:
        x = tl.load(src, mask=mask)
        tl.store(dst, x.to(codes_ptr.dtype.element_ty), mask=mask)
    else:
        x_lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x_hi = x_lo
        if BITS == 4:
            x_hi = tl.load(src + DC, mask=mask, other=0.0).to(tl.float32)
        codes, scale_s, mn_s = _quantize_tile(x_lo, x_hi, mask, mask, BITS, sz_ptr.dtype.element_ty)
        tl.store(dst, codes, mask=mask)
        hmask = h < H
        tl.store(sz_ptr + dst_row * 2, scale_s.to(sz_ptr.dtype.element_ty), mask=hmask)
        tl.store(sz_ptr + dst_row * 2 + 1, mn_s.to(sz_ptr.dtype.element_ty), mask=hmask)


def _write_launch(
    x: torch.Tensor,
    slots: torch.Tensor | None,
    codes: torch.Tensor,
    scale_zero: torch.Tensor | None,
    bits: int,
) -> Launch:
    """``x`` is ``[T, H, D]`` with a contiguous last dim; outputs are contiguous."""
    t, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    sz = scale_zero if scale_zero is not None else codes  # placeholder pointer for bits 0
    p = write_launch(d, bits)
    return Launch(
        _write_kernel,
        (t, triton.cdiv(h, p.block_h)),
        (x, slots if slots is not None else codes, codes, sz, x.stride(0), x.stride(1), h),
        dict(
            D=d,
            BITS=bits,
            HAS_SLOTS=slots is not None,
            BLOCK_H=p.block_h,
            BLOCK_C=p.block_c,
            num_warps=p.num_warps,
        ),
    )


@_jit()
def _channel_quantize(x: tl.tensor, mask: tl.tensor, SZ_DTYPE: tl.constexpr) -> Any:
    """int4 codes of ``x [BLOCK_T, BLOCK_C]`` with one stored (scale, min) per column."""
    mn = tl.min(tl.where(mask, x, float("inf")), axis=0)
    mx = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    scale_s = tl.maximum((mx - mn) / 15.0, EPS_VALUE).to(SZ_DTYPE).to(tl.float32)
    mn_s = mn.to(SZ_DTYPE).to(tl.float32)
    q = tl.minimum(tl.maximum((x - mn_s[None, :]) / scale_s[None, :] + 0.5, 0.0), 15.0)
    return q.to(tl.int32), scale_s, mn_s


@_jit("num_kv_heads", "cache_block")
def _seal_kernel(
    x_ptr: tl.tensor,  # [T, KVH, D] new keys (last dim contiguous)
    slot_ptr: tl.tensor,  # int64 [T]
    res_ptr: tl.tensor,  # [R, cache_block, KVH, D] residual keys, cache dtype
    rmap_ptr: tl.tensor,  # int32 [num_blocks]: residual slot of each block
    codes_ptr: tl.tensor,  # uint8 [num_blocks, cache_block, KVH, D/2]
    sz_ptr: tl.tensor,  # [num_blocks, KVH, D, 2]
    stride_xt: tl.tensor,
    stride_xh: tl.tensor,
    num_kv_heads: tl.tensor,
    cache_block: tl.tensor,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,  # power of two >= cache_block
    BLOCK_C: tl.constexpr,  # power of two >= D / 2
) -> None:
    """One program per (token, KV head); a token that fills its block quantizes the block.

    The block's tokens written by this call sit just before the filling token (a block's tokens
    are consecutive in one write); the earlier ones come from the block's residual slot.
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    KVH = num_kv_heads
    slot = tl.load(slot_ptr + t)
    if (slot < 0) | (slot % cache_block != cache_block - 1):
        return
    blk = slot // cache_block
    DC: tl.constexpr = D // 2
    o = tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    o_ok = o < cache_block
    cmask = c < DC
    src_t = t - (cache_block - 1) + o
    src_ok = o_ok & (src_t >= 0)
    src_slot = tl.load(slot_ptr + src_t, mask=src_ok, other=-1)
    in_write = src_ok & (src_slot == blk * cache_block + o)
    rslot = tl.load(rmap_ptr + blk).to(tl.int64)
    # Masked-out source slots read as -1, never a valid slot.
    from_res = o_ok & (src_slot != blk * cache_block + o) & (o * 0 + rslot >= 0)
    x_off = src_t[:, None] * stride_xt + h * stride_xh + c[None, :]
    r_off = ((rslot * cache_block + o) * KVH + h)[:, None] * D + c[None, :]
    mask = o_ok[:, None] & cmask[None, :]
    wmask = in_write[:, None] & cmask[None, :]
    rmask = from_res[:, None] & cmask[None, :]
    SZ_DTYPE = sz_ptr.dtype.element_ty
    # Channels [0, D/2) (low nibbles), then [D/2, D) (high nibbles).
    x_lo = tl.where(
        wmask,
        tl.load(x_ptr + x_off, mask=wmask, other=0.0).to(tl.float32),
        tl.load(res_ptr + r_off, mask=rmask, other=0.0).to(tl.float32),
    )
    q_lo, s_lo, m_lo = _channel_quantize(x_lo, mask, SZ_DTYPE)
    x_hi = tl.where(
        wmask,
        tl.load(x_ptr + x_off + DC, mask=wmask, other=0.0).to(tl.float32),
        tl.load(res_ptr + r_off + DC, mask=rmask, other=0.0).to(tl.float32),
    )
    q_hi, s_hi, m_hi = _channel_quantize(x_hi, mask, SZ_DTYPE)
    dst = codes_ptr + ((blk * cache_block + o) * KVH + h)[:, None] * DC + c[None, :]
    tl.store(dst, (q_lo | (q_hi << 4)).to(tl.uint8), mask=mask)
    sz = sz_ptr + ((blk * KVH + h) * D + c) * 2
    tl.store(sz, s_lo.to(SZ_DTYPE), mask=cmask)
    tl.store(sz + 1, m_lo.to(SZ_DTYPE), mask=cmask)
    tl.store(sz + 2 * DC, s_hi.to(SZ_DTYPE), mask=cmask)
    tl.store(sz + 2 * DC + 1, m_hi.to(SZ_DTYPE), mask=cmask)


def _key_block_channel_launches(
    cache: KVCache, layer: int, k: torch.Tensor, slot_mapping: torch.Tensor
) -> list[Launch]:
    """Block-channel keys: quantize each block that this write fills, then scatter the other
    tokens to their block's residual slot (in that order: a sequence's next, partial block may
    reuse the slot of the block it just filled). No host sync: residual rows are computed on
    the device."""
    t, kvh, d = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    bs = cache.block_size
    residual = cache.k_residual[layer]
    p = seal_launch(d, bs)
    seal = Launch(
        _seal_kernel,
        (t, kvh),
        (
            k,
            slot_mapping,
            residual,
            cache.residual_map,
            cache.k[layer],
            cache.k_scale_zero[layer],
            k.stride(0),
            k.stride(1),
            kvh,
            bs,
        ),
        dict(D=d, BLOCK_T=p.block_t, BLOCK_C=p.block_c, num_warps=p.num_warps),
    )
    # A token goes to the residual unless its block's last slot is written in this call.
    offs = slot_mapping.remainder(bs)
    last = torch.arange(t, device=k.device) + (bs - 1 - offs)
    last_slot = slot_mapping[last.clamp(max=t - 1)]
    fills = (last < t) & (last_slot == slot_mapping + (bs - 1 - offs))
    blocks = slot_mapping.clamp(min=0) // bs
    rows = cache.residual_map[blocks].to(torch.int64) * bs + offs
    rows = torch.where((slot_mapping >= 0) & ~fills, rows, torch.full_like(rows, -1))
    return [seal, _write_launch(k, rows, residual, None, 0)]


def write_launches(
    cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> list[Launch]:
    """The launches of :func:`write_triton`, in order: K (block-channel: seal, then residual
    scatter), then V."""
    keys = (
        _key_block_channel_launches(cache, layer, k, slot_mapping)
        if cache.block_channel
        else [_write_launch(k, slot_mapping, cache.k[layer], cache.k_scale_zero[layer], cache.bits)]
    )
    return keys + [
        _write_launch(v, slot_mapping, cache.v[layer], cache.v_scale_zero[layer], cache.bits)
    ]


def write_triton(
    cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Fused quantize-and-scatter of ``k``, ``v`` ``[T, kv_heads, D]`` into their slots."""
    for launch in write_launches(cache, layer, k, v, slot_mapping):
        launch()


def quantize_launches(
    x: torch.Tensor, bits: int
) -> tuple[list[Launch], torch.Tensor, torch.Tensor]:
    """The launches of :func:`quantize_triton` and the codes and scales they fill."""
    qmax(bits)
    d = x.shape[-1]
    lead = x.shape[:-1]
    if x.dtype == torch.float64:
        x = x.to(torch.float32)  # scale_zero is float32 for float64 input, as in torch
    rows = x.reshape(-1, 1, d)
    codes = torch.empty(*lead, code_dim(d, bits), dtype=torch.uint8, device=x.device)
    sz = torch.empty(*lead, 2, dtype=scale_zero_dtype(x.dtype), device=x.device)
    launches = [_write_launch(rows, None, codes, sz, bits)] if rows.shape[0] else []
    return launches, codes, sz


def quantize_triton(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvquant.quantize` in Triton (``x[..., D]``, validated by the caller)."""
    launches, codes, sz = quantize_launches(x, bits)
    for launch in launches:
        launch()
    return codes, sz


@_jit("N")
def _dequantize_kernel(
    codes_ptr: tl.tensor,  # uint8 [N, DC]
    sz_ptr: tl.tensor,  # [N, 2]
    out_ptr: tl.tensor,  # [N, D]
    N: tl.tensor,
    D: tl.constexpr,
    BITS: tl.constexpr,
    CLAMP: tl.constexpr,  # clamp to +-CLAMP before the cast (float16 output), 0 = no clamp
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
) -> None:
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    DC: tl.constexpr = D // 2 if BITS == 4 else D
    rmask = r < N
    mask = rmask[:, None] & (c[None, :] < DC)
    raw = tl.load(codes_ptr + r[:, None] * DC + c[None, :], mask=mask, other=0).to(tl.int32)
    s = tl.load(sz_ptr + r * 2, mask=rmask, other=0.0).to(tl.float32)[:, None]
    m = tl.load(sz_ptr + r * 2 + 1, mask=rmask, other=0.0).to(tl.float32)[:, None]
    if BITS == 4:
        lo = (raw & 0xF).to(tl.float32) * s + m
        hi = ((raw >> 4) & 0xF).to(tl.float32) * s + m
        if CLAMP > 0:
            lo = tl.minimum(tl.maximum(lo, -CLAMP), CLAMP)
            hi = tl.minimum(tl.maximum(hi, -CLAMP), CLAMP)
        dst = out_ptr + r[:, None] * D + c[None, :]
        tl.store(dst, lo.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + DC, hi.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        x = raw.to(tl.float32) * s + m
        if CLAMP > 0:
            x = tl.minimum(tl.maximum(x, -CLAMP), CLAMP)
        tl.store(out_ptr + r[:, None] * D + c[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_launches(
    codes: torch.Tensor, scale_zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> tuple[list[Launch], torch.Tensor]:
    """The launches of :func:`dequantize_triton` and the buffer they fill."""
    dc = codes.shape[-1]
    d = 2 * dc if bits == 4 else dc
    # float16 is written by the kernel; bfloat16 (which the interpreter rounds by truncation)
    # and float64 are cast from float32 by torch, so every backend rounds the same way.
    out_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    out = torch.empty(*codes.shape[:-1], d, dtype=out_dtype, device=codes.device)
    flat_codes = codes.reshape(-1, dc).contiguous()
    n = flat_codes.shape[0]
    if not n:
        return [], out
    p = dequantize_launch(d, bits)
    clamp = torch.finfo(torch.float16).max if dtype == torch.float16 else 0.0
    launch = Launch(
        _dequantize_kernel,
        (triton.cdiv(n, p.block_r),),
        (flat_codes, scale_zero.reshape(-1, 2).contiguous(), out, n),
        dict(
            D=d,
            BITS=bits,
            CLAMP=clamp,
            BLOCK_R=p.block_r,
            BLOCK_C=p.block_c,
            num_warps=p.num_warps,
        ),
    )
    return [launch], out


def dequantize_triton(
    codes: torch.Tensor, scale_zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`kvquant.dequantize` in Triton (validated by the caller)."""
    launches, out = dequantize_launches(codes, scale_zero, bits, dtype)
    for launch in launches:
        launch()
    return out.to(dtype)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------


@_jit()
def _find_sequence(
    tile: tl.tensor, cu_tiles_ptr: tl.tensor, num_seqs: tl.tensor, search_steps: tl.tensor
) -> Any:
    """Sequence ``b`` with ``cu_tiles[b] <= tile < cu_tiles[b + 1]`` (binary search).

    The grid is an upper bound on the number of query tiles (known on the host without
    reading the lengths), so each program finds its sequence on the device.
    """
    lo = tile * 0
    hi = lo + num_seqs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go = tl.load(cu_tiles_ptr + mid) <= tile
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@_jit()
def _mm(a: tl.tensor, b: tl.tensor, DOT_DTYPE: tl.constexpr) -> Any:
    """``a @ b`` with float32 accumulation; exact float32 products when DOT_DTYPE is float32."""
    if tl.float32 == DOT_DTYPE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@_jit()
def _load_kv(
    base_ptr: tl.tensor,
    sz_ptr: tl.tensor,
    row: tl.tensor,
    row_ok: tl.tensor,
    c: tl.tensor,
    mask: tl.tensor,
    BITS: tl.constexpr,
    HALF: tl.constexpr,
    DC: tl.constexpr,
) -> Any:
    """De-quantized float32 tile ``[BLOCK_N, BLOCK_C]`` of cache rows ``row`` (int64).

    For bits 4, ``HALF`` 0 returns channels ``[0, D/2)`` (low nibbles) and 1 returns
    ``[D/2, D)`` (high nibbles). Masked entries are 0, never garbage.
    """
    raw = tl.load(base_ptr + row[:, None] * DC + c[None, :], mask=mask, other=0)
    if BITS == 0:
        x = raw.to(tl.float32)
    else:
        codes = raw.to(tl.int32)
        if BITS == 4:
            codes = (codes >> (4 * HALF)) & 0xF  # HALF 0: low nibble, 1: high nibble
        s = tl.load(sz_ptr + row * 2, mask=row_ok, other=0.0).to(tl.float32)
        m = tl.load(sz_ptr + row * 2 + 1, mask=row_ok, other=0.0).to(tl.float32)
        x = codes.to(tl.float32) * s[:, None] + m[:, None]
    # Slots past a sequence's end may hold NaN; 0 keeps p * v finite.
    return tl.where(mask, x, 0.0)


@_jit()
def _load_k_channel(
    k_ptr: tl.tensor,
    ksz_ptr: tl.tensor,
    res_ptr: tl.tensor,
    rmap_ptr: tl.tensor,
    blk: tl.tensor,
    j: tl.tensor,
    seq_len: tl.tensor,
    row: tl.tensor,
    kvh: tl.tensor,
    c: tl.tensor,
    kmask: tl.tensor,
    num_kv_heads: tl.tensor,
    cache_block: tl.tensor,
    HALF: tl.constexpr,
    D: tl.constexpr,
    DC: tl.constexpr,
) -> Any:
    """Block-channel keys ``[BLOCK_N, BLOCK_C]`` (channels ``c + HALF * D/2``) at positions
    ``j``: de-quantized with their block's per-channel (scale, min) where the block is full,
    the exact residual keys where it is the sequence's last, partial block."""
    full = (j // cache_block + 1) * cache_block <= seq_len
    is_open = (j // cache_block + 1) * cache_block > seq_len
    ch = c + HALF * DC
    fmask = kmask & full[:, None]
    raw = tl.load(k_ptr + row[:, None] * DC + c[None, :], mask=fmask, other=0).to(tl.int32)
    codes = (raw >> (4 * HALF)) & 0xF
    sz_off = ((blk.to(tl.int64) * num_kv_heads + kvh) * D)[:, None] + ch[None, :]
    s = tl.load(ksz_ptr + sz_off * 2, mask=fmask, other=0.0).to(tl.float32)
    m = tl.load(ksz_ptr + sz_off * 2 + 1, mask=fmask, other=0.0).to(tl.float32)
    omask = kmask & is_open[:, None]
    rslot = tl.load(rmap_ptr + blk, mask=is_open, other=0).to(tl.int64)
    rrow = (rslot * cache_block + j % cache_block) * num_kv_heads + kvh
    res = tl.load(res_ptr + rrow[:, None] * D + ch[None, :], mask=omask, other=0.0)
    x = tl.where(full[:, None], codes.to(tl.float32) * s + m, res.to(tl.float32))
    return tl.where(kmask, x, 0.0)


@_jit(
    "num_seqs",
    "stride_bt",
    "num_kv_heads",
    "group",
    "cache_block",
    "block_q",
    "block_g",
    "num_splits",
    "search_steps",
)
def _attention_kernel(
    q_ptr: tl.tensor,
    out_ptr: tl.tensor,
    k_ptr: tl.tensor,
    v_ptr: tl.tensor,
    ksz_ptr: tl.tensor,
    vsz_ptr: tl.tensor,
    kres_ptr: tl.tensor,  # block-channel: residual keys [R, cache_block, KVH, D]
    rmap_ptr: tl.tensor,  # block-channel: int32 residual slot of each block
    block_tables_ptr: tl.tensor,
    seq_lens_ptr: tl.tensor,
    query_lens_ptr: tl.tensor,
    cu_q_ptr: tl.tensor,  # int32 [B + 1]: first token of each sequence in q
    cu_tiles_ptr: tl.tensor,  # int32 [B + 1]: first query tile of each sequence
    part_acc_ptr: tl.tensor,  # float32 [tiles, KVH, num_splits, ROWS, D] (SPLIT only)
    part_ml_ptr: tl.tensor,  # float32 [tiles, KVH, num_splits, ROWS, 2] (SPLIT only)
    scale_log2: tl.tensor,  # softmax_scale * log2(e)
    num_seqs: tl.tensor,
    stride_qt: tl.tensor,
    stride_qh: tl.tensor,
    stride_ot: tl.tensor,
    stride_oh: tl.tensor,
    stride_bt: tl.tensor,
    num_kv_heads: tl.tensor,
    group: tl.tensor,  # query heads per KV head
    cache_block: tl.tensor,  # tokens per cache block
    block_q: tl.tensor,  # query tokens per tile; block_q * block_g == ROWS
    block_g: tl.tensor,  # group padded to a power of two
    num_splits: tl.tensor,
    search_steps: tl.tensor,  # ceil(log2(num_seqs + 1))
    D: tl.constexpr,
    BITS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,  # power of two >= D (bits 0/8) or D/2 (bits 4), >= 16
    SPLIT: tl.constexpr,  # num_splits > 1: write partial results for _combine_kernel
    DOT_DTYPE: tl.constexpr,
    KEY_CHANNEL: tl.constexpr,  # block-channel int4 keys (bits 4 only)
) -> None:
    """One program per (query tile of one sequence, KV head, KV split).

    Rows are ``block_q`` query tokens x ``block_g`` (padded) query heads of the KV head's
    group; an online softmax runs over the sequence's keys up to the tile's last position.
    With ``SPLIT`` the keys are cut into ``num_splits`` ranges and partial results go to
    scratch for :func:`_combine_kernel` (flash-decoding).
    """
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if tile >= tl.load(cu_tiles_ptr + num_seqs):
        return
    b = _find_sequence(tile, cu_tiles_ptr, num_seqs, search_steps)
    q_len = tl.load(query_lens_ptr + b)
    seq_len = tl.load(seq_lens_ptr + b)
    m0 = (tile - tl.load(cu_tiles_ptr + b)) * block_q
    ctx = seq_len - q_len

    DC: tl.constexpr = D // 2 if BITS == 4 else D
    r = tl.arange(0, ROWS)
    qi = r // block_g
    gi = r % block_g
    row_ok = (m0 + qi < q_len) & (gi < group)
    tok = (tl.load(cu_q_ptr + b) + m0 + qi).to(tl.int64)
    head = kvh * group + gi
    qpos = ctx + m0 + qi
    c = tl.arange(0, BLOCK_C)
    cmask = c < DC
    qmask = row_ok[:, None] & cmask[None, :]
    q_off = tok[:, None] * stride_qt + head[:, None] * stride_qh + c[None, :]
    # Kept in the dot's input dtype: exact (q is stored in it, or widened to float32) and half
    # the registers of a float32 copy.
    q_lo = tl.load(q_ptr + q_off, mask=qmask, other=0.0).to(DOT_DTYPE)
    q_hi = q_lo
    if BITS == 4:
        q_hi = tl.load(q_ptr + q_off + DC, mask=qmask, other=0.0).to(DOT_DTYPE)

    kv_end = tl.minimum(seq_len, ctx + m0 + block_q)  # keys the tile's last token sees
    n_tiles = tl.cdiv(kv_end, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    j_start = split * per_split
    j_stop = tl.minimum(n_tiles, j_start + per_split)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc_lo = tl.zeros([ROWS, BLOCK_C], tl.float32)
    acc_hi = tl.zeros([ROWS, BLOCK_C], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for jt in range(j_start, j_stop):
        j = jt * BLOCK_N + n
        j_ok = j < kv_end
        blk = tl.load(block_tables_ptr + b * stride_bt + j // cache_block, mask=j_ok, other=0)
        row = (blk.to(tl.int64) * cache_block + j % cache_block) * num_kv_heads + kvh
        kmask = j_ok[:, None] & cmask[None, :]
        if KEY_CHANNEL:
            k_lo = _load_k_channel(
                k_ptr, ksz_ptr, kres_ptr, rmap_ptr, blk, j, seq_len, row, kvh, c, kmask,
                num_kv_heads, cache_block, 0, D, DC,
            )  # fmt: skip
            s = _mm(q_lo, tl.trans(k_lo), DOT_DTYPE)
            k_hi = _load_k_channel(
                k_ptr, ksz_ptr, kres_ptr, rmap_ptr, blk, j, seq_len, row, kvh, c, kmask,
                num_kv_heads, cache_block, 1, D, DC,
            )  # fmt: skip
            s += _mm(q_hi, tl.trans(k_hi), DOT_DTYPE)
        else:
            k_lo = _load_kv(k_ptr, ksz_ptr, row, j_ok, c, kmask, BITS, 0, DC)
            s = _mm(q_lo, tl.trans(k_lo), DOT_DTYPE)
            if BITS == 4:
                k_hi = _load_kv(k_ptr, ksz_ptr, row, j_ok, c, kmask, BITS, 1, DC)
                s += _mm(q_hi, tl.trans(k_hi), DOT_DTYPE)
        s = s * scale_log2
        allowed = (j[None, :] <= qpos[:, None]) & j_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no allowed key yet keeps m = -inf; exp2 against 0 keeps it NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_lo = _load_kv(v_ptr, vsz_ptr, row, j_ok, c, kmask, BITS, 0, DC)
        acc_lo = acc_lo * alpha[:, None] + _mm(p, v_lo, DOT_DTYPE)
        if BITS == 4:
            v_hi = _load_kv(v_ptr, vsz_ptr, row, j_ok, c, kmask, BITS, 1, DC)
            acc_hi = acc_hi * alpha[:, None] + _mm(p, v_hi, DOT_DTYPE)
        m_i = m_new

    if not SPLIT:
        inv = 1.0 / tl.where(l_i > 0.0, l_i, 1.0)
        o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + c[None, :]
        dty = out_ptr.dtype.element_ty
        tl.store(out_ptr + o_off, (acc_lo * inv[:, None]).to(dty), mask=qmask)
        if BITS == 4:
            tl.store(out_ptr + o_off + DC, (acc_hi * inv[:, None]).to(dty), mask=qmask)
    else:
        part = ((tile.to(tl.int64) * num_kv_heads + kvh) * num_splits + split) * ROWS + r
        a_off = part[:, None] * D + c[None, :]
        amask = cmask[None, :] & (r[:, None] >= 0)
        tl.store(part_acc_ptr + a_off, acc_lo, mask=amask)
        if BITS == 4:
            tl.store(part_acc_ptr + a_off + DC, acc_hi, mask=amask)
        tl.store(part_ml_ptr + part * 2, m_i)
        tl.store(part_ml_ptr + part * 2 + 1, l_i)


@_jit("num_seqs", "num_kv_heads", "group", "block_q", "block_g", "num_splits", "search_steps")
def _combine_kernel(
    out_ptr: tl.tensor,
    cu_q_ptr: tl.tensor,
    query_lens_ptr: tl.tensor,
    cu_tiles_ptr: tl.tensor,
    part_acc_ptr: tl.tensor,
    part_ml_ptr: tl.tensor,
    num_seqs: tl.tensor,
    stride_ot: tl.tensor,
    stride_oh: tl.tensor,
    num_kv_heads: tl.tensor,
    group: tl.tensor,
    block_q: tl.tensor,
    block_g: tl.tensor,
    num_splits: tl.tensor,
    search_steps: tl.tensor,
    D: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
) -> None:
    """Merge the ``num_splits`` partial softmax results of one (query tile, KV head)."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    if tile >= tl.load(cu_tiles_ptr + num_seqs):
        return
    b = _find_sequence(tile, cu_tiles_ptr, num_seqs, search_steps)
    q_len = tl.load(query_lens_ptr + b)
    m0 = (tile - tl.load(cu_tiles_ptr + b)) * block_q
    r = tl.arange(0, ROWS)
    qi = r // block_g
    gi = r % block_g
    row_ok = (m0 + qi < q_len) & (gi < group)
    tok = (tl.load(cu_q_ptr + b) + m0 + qi).to(tl.int64)
    head = kvh * group + gi
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    m_run = tl.full([ROWS], float("-inf"), tl.float32)
    l_run = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    base = (tile.to(tl.int64) * num_kv_heads + kvh) * num_splits
    for sp in range(num_splits):
        part = (base + sp) * ROWS + r
        m_s = tl.load(part_ml_ptr + part * 2)
        l_s = tl.load(part_ml_ptr + part * 2 + 1)
        a_s = tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=dmask[None, :], other=0.0)
        m_new = tl.maximum(m_run, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_run = tl.exp2(m_run - m_safe)
        w_s = tl.exp2(m_s - m_safe)
        l_run = l_run * w_run + l_s * w_s
        acc = acc * w_run[:, None] + a_s * w_s[:, None]
        m_run = m_new
    inv = 1.0 / tl.where(l_run > 0.0, l_run, 1.0)
    o_off = tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(
        out_ptr + o_off,
        (acc * inv[:, None]).to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dmask[None, :],
    )


def attention_launches(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
    num_sms: int | None = None,
    arch: int | None = None,
) -> tuple[list[Launch], torch.Tensor]:
    """The launches of :func:`attention_triton` and the output they fill.

    ``num_sms`` (streaming multiprocessors) and ``arch`` (compute capability x10), ``None``
    off-GPU, are the device's, for :func:`kvquant.launch.attention_launch`; ``num_splits``
    overrides its split-K heuristic.
    """
    t, num_heads, d = q.shape
    batch = seq_lens.shape[0]
    kvh = cache.num_kv_heads
    g = num_heads // kvh
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # The interpreter mishandles bfloat16 arithmetic: its dots run in float32.
    float32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _interpreting())
    dot_dtype = tl.float32 if float32 else _TL_DTYPES[q.dtype]
    p = attention_launch(
        num_tokens=t,
        batch=batch,
        group=g,
        head_dim=d,
        bits=cache.bits,
        float32=float32,
        max_kv=block_tables.shape[1] * cache.block_size,
        num_kv_heads=kvh,
        num_sms=num_sms,
        arch=arch,
        num_splits=num_splits,
    )

    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_q = torch.cat([zero, torch.cumsum(query_lens, 0, dtype=torch.int32)])
    n_tiles = (query_lens + (p.block_q - 1)) // p.block_q
    cu_tiles = torch.cat([zero, torch.cumsum(n_tiles, 0, dtype=torch.int32)])
    grid_tiles = triton.cdiv(t, p.block_q) + batch
    splits = p.num_splits
    search_steps = max(1, math.ceil(math.log2(batch + 1)))

    k, v = cache.k[layer], cache.v[layer]
    ksz = cache.k_scale_zero[layer]
    vsz = cache.v_scale_zero[layer]
    if splits > 1:
        parts = grid_tiles * kvh * splits * p.rows
        part_acc = torch.empty(parts * d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(parts * 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused placeholders
    tiling = (kvh, g, p.block_q, p.block_g, splits, search_steps)
    launches = [
        Launch(
            _attention_kernel,
            (grid_tiles, kvh, splits),
            (
                q,
                out,
                k,
                v,
                ksz if ksz is not None else k,
                vsz if vsz is not None else v,
                cache.k_residual[layer] if cache.block_channel else k,
                cache.residual_map if cache.block_channel else k,
                block_tables,
                seq_lens,
                query_lens,
                cu_q,
                cu_tiles,
                part_acc,
                part_ml,
                softmax_scale * math.log2(math.e),
                batch,
                q.stride(0),
                q.stride(1),
                out.stride(0),
                out.stride(1),
                block_tables.stride(0),
                kvh,
                g,
                cache.block_size,
                p.block_q,
                p.block_g,
                splits,
                search_steps,
            ),
            dict(
                D=d,
                BITS=cache.bits,
                ROWS=p.rows,
                BLOCK_N=p.block_n,
                BLOCK_C=p.block_c,
                SPLIT=splits > 1,
                DOT_DTYPE=dot_dtype,
                KEY_CHANNEL=cache.block_channel,
                num_warps=p.num_warps,
                num_stages=p.num_stages,
            ),
        )
    ]
    if splits > 1:
        launches.append(
            Launch(
                _combine_kernel,
                (grid_tiles, kvh),
                (
                    out,
                    cu_q,
                    query_lens,
                    cu_tiles,
                    part_acc,
                    part_ml,
                    batch,
                    out.stride(0),
                    out.stride(1),
                    *tiling,
                ),
                dict(
                    D=d,
                    ROWS=p.rows,
                    BLOCK_D=pow2(d),
                    num_warps=p.combine_warps,
                    num_stages=p.combine_stages,
                ),
            )
        )
    return launches, out


def attention_triton(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """:func:`kvquant.attention` in Triton; ``num_splits`` overrides the split-K heuristic.

    No device value is read on the host: the launch grid is an upper bound on the number of
    query tiles (``cdiv(T, BLOCK_Q) + B``); surplus programs exit at once.
    """
    num_sms = arch = None
    if q.device.type == "cuda":
        props = torch.cuda.get_device_properties(q.device)
        num_sms, arch = props.multi_processor_count, 10 * props.major + props.minor
    launches, out = attention_launches(
        q, cache, layer, block_tables, seq_lens, query_lens, softmax_scale, num_splits, num_sms,
        arch,
    )
    for launch in launches:
        launch()
    return out
