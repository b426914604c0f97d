"""Public entry points: input checks and backend selection.

The checks here are cheap (shapes, dtypes, devices): ``write`` and ``attention`` run for every
layer of every engine step, so nothing here reads a device tensor's values.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from . import quantization
from .attention_plan import AttentionPlan, plan_attention
from .kv_cache import KVCache
from .torch_ops import attention_torch, write_torch

__all__ = [
    "Backend",
    "attention",
    "dequantize",
    "plan_for",
    "quantize",
    "resolve_backend",
    "write",
]

Backend = Literal["auto", "triton", "torch"]

_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(backend: str, device: torch.device) -> Literal["triton", "torch"]:
    """The implementation ``backend`` names for tensors on ``device``.

    ``"auto"`` is Triton for CUDA tensors and torch otherwise; ``"triton"`` and ``"torch"``
    force one. Triton on a non-CUDA device needs the Triton interpreter
    (``TRITON_INTERPRET=1`` set before triton is first imported).

    Raises:
        ValueError: unknown backend, or Triton forced on a CPU tensor without the interpreter.
    """
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' on {device} tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported, or use backend='torch'"
            )
        return "triton"
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def quantize(
    x: torch.Tensor, bits: int, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x[..., D]`` per row: ``(codes, scale_zero)``.

    ``codes`` is uint8 ``[..., D]`` (bits 8) or ``[..., D/2]`` (bits 4, channel ``d`` in the
    low nibble, ``d + D/2`` in the high one); ``scale_zero`` is ``[..., 2]`` ``(scale, min)``,
    float16 for float16 ``x`` and float32 otherwise. ``scale = max((max-min)/(2^bits-1), EPS)``,
    ``q = clamp(floor((x-min)/scale + 0.5), 0, 2^bits-1)`` with the stored scale and min.

    Raises:
        ValueError: ``bits`` not 8 or 4 (bits 0 stores values as they are), non-floating
            ``x``, empty or (bits 4) odd last dimension, unknown backend.
    """
    quantization.check_quantize_args(x, bits)
    if resolve_backend(backend, x.device) == "torch":
        return quantization.quantize(x, bits)
    from .triton_kernels import quantize_triton

    return quantize_triton(x, bits)


def dequantize(
    codes: torch.Tensor,
    scale_zero: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``x_hat = q * scale + min`` of :func:`quantize`'s output, ``[..., D]`` in ``dtype``.

    A float16 result is clamped to the float16 range.

    Raises:
        ValueError: ``bits`` not 8 or 4, wrong dtypes, mismatched shapes or devices.
    """
    quantization.check_dequantize_args(codes, scale_zero, bits, dtype)
    if resolve_backend(backend, codes.device) == "torch":
        return quantization.dequantize(codes, scale_zero, bits, dtype)
    from .triton_kernels import dequantize_triton

    return dequantize_triton(codes, scale_zero, bits, dtype)


def _check_layer(cache: KVCache, layer: int) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a kvquant.KVCache, got {type(cache).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer must be an int in [0, {cache.num_layers}), got {layer!r}")


def _check_device(name: str, t: torch.Tensor, cache: KVCache) -> None:
    if t.device != cache.k[0].device:
        raise ValueError(f"{name} is on {t.device} but the cache is on {cache.k[0].device}")


def write(
    cache: KVCache,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: Backend = "auto",
) -> None:
    """Store new keys and values of ``layer``, quantizing them on the way (bits 4/8).

    Args:
        cache: the destination.
        layer: layer index in ``[0, cache.num_layers)``.
        k, v: ``[T, num_kv_heads, head_dim]`` in the cache's dtype, on its device.
        slot_mapping: int64 ``[T]``; token ``t`` goes to slot ``slot_mapping[t]``
            (``block_id * block_size + offset``); ``-1`` skips the token (padding).
            Slots must be ``< cache.num_slots`` and distinct (not checked: that would read
            device memory on every step).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Raises:
        ValueError/TypeError: wrong shapes, dtypes, devices, layer or backend.
    """
    _check_layer(cache, layer)
    expect = (cache.num_kv_heads, cache.head_dim)
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != expect:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [T, {expect[0]}, {expect[1]}], got {shape}")
        if t.dtype != cache.dtype:
            raise ValueError(
                f"{name} is {t.dtype} but the cache holds {cache.dtype}; cast it first"
            )
        _check_device(name, t, cache)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    if (
        not isinstance(slot_mapping, torch.Tensor)
        or slot_mapping.dtype != torch.int64
        or tuple(slot_mapping.shape) != (k.shape[0],)
    ):
        got = (
            f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}"
            if isinstance(slot_mapping, torch.Tensor)
            else type(slot_mapping).__name__
        )
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}], got {got}")
    _check_device("slot_mapping", slot_mapping, cache)
    if k.shape[0] == 0:
        return
    if cache.rotates_values:
        v = (v.to(torch.float32) @ cache.value_rotation()).to(cache.dtype)
    if resolve_backend(backend, cache.k[0].device) == "torch":
        write_torch(cache, layer, k, v, slot_mapping)
    else:
        from .triton_kernels import write_triton  # imported late: triton reads its env at import

        write_triton(cache, layer, k, v, slot_mapping)


def plan_for(
    cache: KVCache,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    num_heads: int,
    backend: Backend = "auto",
) -> AttentionPlan | None:
    """The plan :func:`attention` would build for this batch on ``cache`` (None when the
    backend is Triton, which needs none): build it once per step, pass it to every layer.

    Raises:
        ValueError: inconsistent lengths, as :func:`attention` does.
    """
    if resolve_backend(backend, cache.k[0].device) != "torch":
        return None
    return plan_attention(
        block_tables,
        seq_lens,
        query_lens,
        cache.block_size,
        num_heads,
        2 * cache.num_kv_heads * cache.head_dim,
    )


def attention(
    q: torch.Tensor,
    cache: KVCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: torch.Tensor,
    softmax_scale: float,
    backend: Backend = "auto",
    plan: AttentionPlan | None = None,
) -> torch.Tensor:
    """Causal paged attention of a batch of query chunks over their cached K/V.

    Prefill chunks and single decode tokens mix freely in one call; K/V are read back from the
    cache (de-quantized inside the kernel), so the current chunk must already be written.

    Args:
        q: ``[T, num_heads, head_dim]`` float16/bfloat16/float32, ``num_heads`` a multiple of
            ``cache.num_kv_heads`` (GQA); ``T = sum(query_lens)``, tokens of sequence 0 first.
        cache: the K/V store; ``layer`` indexes it.
        block_tables: int32 ``[B, max_blocks]``: block ids of each sequence in position order;
            padding entries may hold any valid block id (they are never read).
        seq_lens: int32 ``[B]``: every token of sequence ``b``, the current chunk included.
        query_lens: int32 ``[B]``: the chunk is the last ``query_lens[b]`` positions of
            sequence ``b`` (``0 <= query_lens[b] <= seq_lens[b]``).
        softmax_scale: multiplies ``q . k`` before the softmax (usually ``head_dim ** -0.5``).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        plan: the torch path's layout of this batch, from :func:`plan_attention` with the
            same ``block_tables`` / ``seq_lens`` / ``query_lens``; a caller running several
            layers over one batch plans once and passes it to each (None: planned here).
            The Triton path ignores it.

    Returns:
        ``[T, num_heads, head_dim]`` in ``q``'s dtype.

    Raises:
        ValueError/TypeError: wrong shapes, dtypes, devices, layer or backend. The torch
        backend also checks the lengths against each other and ``T``; the Triton backend does
        not (that would sync the GPU), and inconsistent lengths give unspecified output.
    """
    _check_layer(cache, layer)
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be [T, num_heads, head_dim], got {shape}")
    t, num_heads, head_dim = q.shape
    if head_dim != cache.head_dim:
        raise ValueError(f"q has head_dim {head_dim} but the cache has {cache.head_dim}")
    if num_heads == 0 or num_heads % cache.num_kv_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must be a positive multiple of the cache's "
            f"num_kv_heads ({cache.num_kv_heads})"
        )
    if q.dtype not in _ATTENTION_DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    _check_device("q", q, cache)
    for name, tensor, dims in (
        ("block_tables", block_tables, 2),
        ("seq_lens", seq_lens, 1),
        ("query_lens", query_lens, 1),
    ):
        if (
            not isinstance(tensor, torch.Tensor)
            or tensor.dtype != torch.int32
            or (tensor.dim() != dims)
        ):
            got = (
                f"{tensor.dtype} with {tensor.dim()} dims"
                if isinstance(tensor, torch.Tensor)
                else type(tensor).__name__
            )
            raise ValueError(f"{name} must be an int32 tensor with {dims} dims, got {got}")
        _check_device(name, tensor, cache)
    batch = seq_lens.shape[0]
    if query_lens.shape[0] != batch or block_tables.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: seq_lens {batch}, query_lens {query_lens.shape[0]}, "
            f"block_tables {block_tables.shape[0]}"
        )
    if batch and block_tables.shape[1] == 0:
        raise ValueError("block_tables has no columns")
    if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
        raise ValueError(f"softmax_scale must be a float, got {softmax_scale!r}")
    if t == 0 or batch == 0:
        return torch.empty_like(q)
    if resolve_backend(backend, cache.k[0].device) == "torch":
        if plan is None:
            plan = plan_for(cache, block_tables, seq_lens, query_lens, num_heads, "torch")
            assert plan is not None
        out = attention_torch(q, cache, layer, plan, float(softmax_scale))
    else:
        from .triton_kernels import attention_triton  # late: triton reads its env at import

        out = attention_triton(
            q, cache, layer, block_tables, seq_lens, query_lens, float(softmax_scale)
        )
    if cache.rotates_values:  # stored values are v @ R; R is its own inverse
        out = (out.to(torch.float32) @ cache.value_rotation()).to(q.dtype)
    return out
