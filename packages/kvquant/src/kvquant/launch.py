"""Launch parameters of the Triton kernels: tiles, warps, pipeline stages and KV splits.

The one place that decides them. :mod:`kvquant.triton_kernels` asks it on every launch and
:mod:`kvquant.aot` asks it when it enumerates what to compile ahead of time, so the AOT report
describes exactly what runs. Pure Python: no torch, no triton.

What shapes a compiled kernel is a *constexpr*: the head size, the bit width, the dtypes and
the tiles chosen here. Per-model and per-step integers (KV heads, GQA group, cache block size,
batch size, number of splits) are runtime arguments, so a model or batch change never triggers
a compile and the set of kernels is small enough to compile and check ahead of time.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AttentionLaunch",
    "DequantizeLaunch",
    "SealLaunch",
    "WriteLaunch",
    "attention_launch",
    "dequantize_launch",
    "pow2",
    "seal_launch",
    "write_launch",
]

# Registers per thread are the limit: a [rows, BLOCK_C] float32 tile costs rows * BLOCK_C /
# (32 * num_warps) registers per thread, and the attention loop keeps about four of them live
# (the accumulator, the de-quantized K and V tiles, the scores). Past 255 registers ptxas spills.


def pow2(n: int, at_least: int = 1) -> int:
    """The smallest power of two ``>= max(n, at_least)``."""
    n = max(n, at_least, 1)
    return 1 << (n - 1).bit_length()


def _code_width(head_dim: int, bits: int) -> int:
    return head_dim // 2 if bits == 4 else head_dim


@dataclass(frozen=True)
class WriteLaunch:
    """``_write_kernel``: one program per (token, tile of ``block_h`` KV heads)."""

    block_h: int
    block_c: int
    num_warps: int


def write_launch(head_dim: int, bits: int) -> WriteLaunch:
    """Tiles of about 1024 values, whatever the number of KV heads (a runtime argument)."""
    block_c = pow2(_code_width(head_dim, bits))
    values_per_head = block_c * (2 if bits == 4 else 1)
    return WriteLaunch(block_h=max(1, 1024 // values_per_head), block_c=block_c, num_warps=4)


@dataclass(frozen=True)
class SealLaunch:
    """``_seal_kernel`` (block-channel keys): one program per (token, KV head); a token that
    fills its block quantizes the block's ``[block_t, head_dim]`` keys."""

    block_t: int
    block_c: int
    num_warps: int


def seal_launch(head_dim: int, block_size: int) -> SealLaunch:
    """The block's tokens (a power of two >= the block size) by half a head of channels; two
    such float32 tiles are live, so tiles past 4096 values take 8 warps."""
    block_t, block_c = pow2(block_size), pow2(head_dim // 2)
    return SealLaunch(block_t, block_c, num_warps=8 if block_t * block_c > 4096 else 4)


@dataclass(frozen=True)
class DequantizeLaunch:
    """``_dequantize_kernel``: one program per ``block_r`` rows."""

    block_r: int
    block_c: int
    num_warps: int


def dequantize_launch(head_dim: int, bits: int) -> DequantizeLaunch:
    block_c = pow2(_code_width(head_dim, bits))
    values_per_row = block_c * (2 if bits == 4 else 1)
    return DequantizeLaunch(block_r=max(1, 2048 // values_per_row), block_c=block_c, num_warps=4)


@dataclass(frozen=True)
class AttentionLaunch:
    """``_attention_kernel`` (and ``_combine_kernel`` when ``num_splits > 1``).

    A program covers ``rows = block_q * block_g`` query rows: ``block_q`` tokens times the GQA
    group padded to ``block_g``, and walks the keys ``block_n`` at a time. ``rows`` is 16 for
    batches of (mostly) single decode tokens and 64 otherwise, or the padded group if larger.
    """

    rows: int
    block_q: int
    block_g: int
    block_n: int
    block_c: int
    num_splits: int
    num_warps: int
    num_stages: int
    combine_warps: int
    combine_stages: int


def attention_launch(
    *,
    num_tokens: int,
    batch: int,
    group: int,
    head_dim: int,
    bits: int,
    float32: bool,
    max_kv: int,
    num_kv_heads: int,
    num_sms: int | None,
    arch: int | None,
    num_splits: int | None = None,
) -> AttentionLaunch:
    """Tiles for one attention call.

    Args:
        num_tokens: query tokens in the batch (``T``); ``batch``: sequences.
        group: query heads per KV head; ``head_dim``, ``bits``: the cache's.
        float32: ``tl.dot`` runs on float32 operands (float32 caches, or bfloat16 under the
            interpreter), which doubles the registers of the dot operands.
        max_kv: an upper bound on any sequence's length (block-table width x block size).
        num_kv_heads: programs per query tile (before splitting).
        num_sms: streaming multiprocessors of the GPU, ``None`` off-GPU (no KV split).
        arch: compute capability x10 (80 for sm_80), ``None`` off-GPU.
        num_splits: forces the number of KV splits (tests); ``None`` picks it.

    The register budget, from the AOT report (``python -m kvquant.aot``): a program keeps a
    ``[rows, head_dim]`` float32 accumulator, its queries, and de-quantized ``[block_n,
    head_dim]`` K and V tiles live. 16-row tiles of heads up to 128, and 64-row tiles of heads
    up to 64, fit 4 warps; larger ones take 8. Before sm_90, Triton's software pipelining holds the next K/V tiles in registers,
    which pushes 64-row tiles to 255 registers and past, so they run unpipelined there.
    """
    block_g = pow2(group)
    decode = num_tokens <= 2 * batch
    rows = max(16 if decode else 64, block_g)
    block_q = rows // block_g
    block_c = pow2(_code_width(head_dim, bits), at_least=16)
    block_n = 32
    width = pow2(head_dim)
    wide = (rows > 16 and width >= 128) or width > 128 or float32
    num_warps = 8 if wide else 4
    num_stages = 1 if arch is not None and arch < 90 and rows > 16 else 3
    if num_splits is None:
        grid_tiles = -(-num_tokens // block_q) + batch
        num_splits = _splits(grid_tiles * num_kv_heads, max_kv, block_n, num_sms)
    return AttentionLaunch(
        rows=rows,
        block_q=block_q,
        block_g=block_g,
        block_n=block_n,
        block_c=block_c,
        num_splits=num_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        # The merge loop reads [rows, head_dim] partials; unpipelined, it never spills.
        combine_warps=8 if rows * pow2(head_dim) > 64 * 128 else 4,
        combine_stages=1,
    )


def _splits(programs: int, max_kv: int, block_n: int, num_sms: int | None) -> int:
    """KV splits so that few, long sequences still fill the GPU (flash-decoding)."""
    if num_sms is None:
        return 1
    want = -(-2 * num_sms // max(programs, 1))
    # Each split should get several KV tiles, or the combine step costs more than it saves.
    cap = max(1, max_kv // (4 * block_n))
    return max(1, min(want, cap, 16))
