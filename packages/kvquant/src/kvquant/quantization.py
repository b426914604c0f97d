"""Per-token, per-head asymmetric quantization of the last dimension (torch implementation).

Format (fixed; the Triton kernels reproduce it bit for bit up to one code on rounding edges):

- ``scale = max((max - min) / (2**bits - 1), EPS)`` and ``min`` over the last dimension, stored
  as ``scale_zero[..., 0] = scale`` and ``scale_zero[..., 1] = min`` in float16 when the input is
  float16 and float32 otherwise (bfloat16 would lose too much).
- ``q = clamp(floor((x - min) / scale + 0.5), 0, 2**bits - 1)`` computed with the *stored* scale
  and min, so every implementation rounds against the same numbers.
- ``x_hat = q * scale + min``.
- bits 8: one uint8 code per channel. bits 4: two codes per uint8, channel ``d`` in the low
  nibble and channel ``d + D/2`` in the high nibble (``D`` must be even).
"""

from __future__ import annotations

import torch

__all__ = [
    "EPS",
    "SUPPORTED_BITS",
    "check_dequantize_args",
    "check_quantize_args",
    "code_dim",
    "dequantize",
    "dequantize_channels",
    "pack_int4",
    "qmax",
    "quantize",
    "quantize_channels",
    "scale_zero_dtype",
    "unpack_int4",
]

#: Smallest scale. A power of two, so float16 (as a subnormal), bfloat16 and float32 hold it
#: exactly: a constant row quantizes to code 0 and reconstructs to its min, never NaN.
EPS: float = 2.0**-20

#: Bit widths the cache stores: 0 (the cache dtype, unquantized), 8 (uint8), 4 (packed).
SUPPORTED_BITS: tuple[int, ...] = (0, 8, 4)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def qmax(bits: int) -> int:
    """Largest code for ``bits`` (255 for 8, 15 for 4). Raises ValueError for other widths."""
    if bits not in (4, 8):
        raise ValueError(
            f"bits must be 8 or 4 to quantize, got {bits!r} "
            "(bits 0 stores values as they are and has no codes)"
        )
    return (1 << bits) - 1


def scale_zero_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of ``(scale, min)`` for values of ``dtype``: float16 for float16, else float32."""
    return torch.float16 if dtype == torch.float16 else torch.float32


def code_dim(head_dim: int, bits: int) -> int:
    """Width of the last dimension of stored K/V: ``head_dim`` for bits 0/8, half for bits 4."""
    return head_dim // 2 if bits == 4 else head_dim


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``q[..., D]`` (uint8, values < 16) into ``[..., D/2]`` uint8.

    Channel ``d`` goes to the low nibble, channel ``d + D/2`` to the high nibble.
    """
    half = q.shape[-1] // 2
    return q[..., :half] | (q[..., half:] << 4)


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., D/2]`` uint8 to ``[..., D]`` uint8 codes."""
    return torch.cat([codes & 0xF, (codes >> 4) & 0xF], dim=-1)


def check_quantize_args(x: torch.Tensor, bits: int) -> int:
    """Validate :func:`quantize`'s arguments; return the largest code. Raises ValueError."""
    top = qmax(bits)
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"quantize expects a floating tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize needs a non-empty last dimension, got shape {tuple(x.shape)}")
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(
            f"bits 4 packs two channels per byte: last dim must be even, got {x.shape[-1]}"
        )
    return top


def check_dequantize_args(
    codes: torch.Tensor, scale_zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> None:
    """Validate :func:`dequantize`'s arguments. Raises ValueError."""
    qmax(bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() == 0:
        raise ValueError("codes must be a uint8 tensor with at least one dimension")
    if not isinstance(scale_zero, torch.Tensor) or scale_zero.dtype not in (
        torch.float16,
        torch.float32,
    ):
        raise ValueError("scale_zero must be a float16 or float32 tensor")
    if scale_zero.shape != (*codes.shape[:-1], 2):
        raise ValueError(
            f"scale_zero shape {tuple(scale_zero.shape)} does not match codes "
            f"{tuple(codes.shape)}: expected {(*codes.shape[:-1], 2)}"
        )
    if scale_zero.device != codes.device:
        raise ValueError(f"codes on {codes.device} but scale_zero on {scale_zero.device}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be floating, got {dtype}")


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x[..., D]`` per row of its last dimension.

    Args:
        x: floating tensor ``[..., D]`` (float16, bfloat16, float32 or float64), any device.
            ``D`` must be even for bits 4. Values must be finite and their range must fit in
            float32 (``max - min < 3.4e38``).
        bits: 8 or 4. ``0`` is an error: bits 0 stores values as they are.

    Returns:
        ``(codes, scale_zero)``: ``codes`` uint8 ``[..., D]`` (bits 8) or ``[..., D/2]``
        (bits 4); ``scale_zero`` ``[..., 2]`` holding ``(scale, min)``, float16 when ``x`` is
        float16 and float32 otherwise.

    Raises:
        ValueError: unsupported ``bits``, non-floating ``x``, empty or odd (bits 4) last dim.
    """
    top = check_quantize_args(x, bits)
    xf = x.to(torch.float32)
    lo = xf.amin(dim=-1)
    hi = xf.amax(dim=-1)
    scale = torch.clamp((hi - lo) / top, min=EPS)
    scale_zero = torch.stack([scale, lo], dim=-1).to(scale_zero_dtype(x.dtype))
    # Round against the stored (possibly float16) scale and min, as the kernels do.
    s = scale_zero[..., 0:1].to(torch.float32)
    m = scale_zero[..., 1:2].to(torch.float32)
    # Clamping before the cast makes truncation equal to floor: the value is >= 0.
    q = ((xf - m) / s + 0.5).clamp_(0.0, float(top)).to(torch.uint8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale_zero


def dequantize(
    codes: torch.Tensor,
    scale_zero: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct ``x_hat = q * scale + min`` from :func:`quantize`'s output.

    Args:
        codes: uint8 ``[..., D]`` (bits 8) or ``[..., D/2]`` (bits 4).
        scale_zero: ``[..., 2]`` float16/float32 ``(scale, min)``, same leading shape as codes.
        bits: 8 or 4.
        dtype: floating dtype of the result. Computed in float32, then cast; a float16 result
            is clamped to the float16 range (the top code of a row that spans the whole
            float16 range can land a fraction of a step above 65504).

    Returns:
        ``x_hat`` of shape ``[..., D]`` and ``dtype``.

    Raises:
        ValueError: unsupported ``bits``, wrong dtypes, or mismatched shapes.
    """
    check_dequantize_args(codes, scale_zero, bits, dtype)
    q = unpack_int4(codes) if bits == 4 else codes
    s = scale_zero[..., 0:1].to(torch.float32)
    m = scale_zero[..., 1:2].to(torch.float32)
    out = q.to(torch.float32) * s + m
    if dtype == torch.float16:
        fmax = torch.finfo(torch.float16).max
        out = out.clamp_(-fmax, fmax)
    return out.to(dtype)


def quantize_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes of ``x[..., N, H, D]`` with one ``(scale, min)`` per (head, channel) over
    the ``N`` tokens (the block-channel key layout: ``N`` is a block's tokens).

    The same formula as :func:`quantize`, over dimension ``-3`` instead of the last one.

    Returns:
        ``(codes, scale_zero)``: codes uint8 ``[..., N, H, D/2]`` packed as bits 4 (channel
        ``d`` low nibble, ``d + D/2`` high nibble); ``scale_zero`` ``[..., H, D, 2]``, float16
        for float16 ``x`` and float32 otherwise.

    Raises:
        ValueError: non-floating ``x``, fewer than 3 dimensions, empty or odd ``D``.
    """
    check_quantize_args(x, 4)
    if x.dim() < 3 or x.shape[-3] == 0:
        raise ValueError(
            f"quantize_channels expects [..., N, H, D] with N >= 1, got {tuple(x.shape)}"
        )
    xf = x.to(torch.float32)
    lo = xf.amin(dim=-3)
    hi = xf.amax(dim=-3)
    scale = torch.clamp((hi - lo) / 15, min=EPS)
    scale_zero = torch.stack([scale, lo], dim=-1).to(scale_zero_dtype(x.dtype))
    s = scale_zero[..., 0].to(torch.float32).unsqueeze(-3)  # [..., 1, H, D]
    m = scale_zero[..., 1].to(torch.float32).unsqueeze(-3)
    q = ((xf - m) / s + 0.5).clamp_(0.0, 15.0).to(torch.uint8)
    return pack_int4(q), scale_zero


def dequantize_channels(
    codes: torch.Tensor, scale_zero: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_channels`: ``[..., N, H, D]`` in ``dtype`` (computed in
    float32; a float16 result is clamped to the float16 range).

    Raises:
        ValueError: wrong dtypes or shapes that do not match.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() < 3:
        raise ValueError("codes must be a uint8 tensor [..., N, H, D/2]")
    lead, heads, half = codes.shape[:-3], codes.shape[-2], codes.shape[-1]
    if not isinstance(scale_zero, torch.Tensor) or scale_zero.dtype not in (
        torch.float16,
        torch.float32,
    ):
        raise ValueError("scale_zero must be a float16 or float32 tensor")
    if scale_zero.shape != (*lead, heads, 2 * half, 2):
        raise ValueError(
            f"scale_zero shape {tuple(scale_zero.shape)} does not match codes "
            f"{tuple(codes.shape)}: expected {(*lead, heads, 2 * half, 2)}"
        )
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be floating, got {dtype}")
    s = scale_zero[..., 0].to(torch.float32).unsqueeze(-3)
    m = scale_zero[..., 1].to(torch.float32).unsqueeze(-3)
    out = unpack_int4(codes).to(torch.float32) * s + m
    if dtype == torch.float16:
        fmax = torch.finfo(torch.float16).max
        out = out.clamp_(-fmax, fmax)
    return out.to(dtype)
