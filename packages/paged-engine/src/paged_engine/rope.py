"""Rotary position embeddings, including Llama 3.x, YaRN and linear scaling.

Frequencies follow transformers' ``modeling_rope_utils`` formula for formula, so a model matches
its reference implementation bit for bit in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["RotaryEmbedding", "rope_frequencies"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(
    head_dim: int, params: Mapping[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` (float32) and the cos/sin scaling factor.

    ``params`` holds ``rope_theta`` and, for scaled variants, ``rope_type`` (or ``type``) with the
    fields transformers uses (``factor``, ``low_freq_factor``, ``original_max_position_embeddings``,
    ``beta_fast``, ...).
    """
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    base = float(params.get("rope_theta", 10000.0))
    dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
    if dim != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, params, max_position_embeddings), 1.0
    if rope_type == "yarn":
        return _yarn(dim, base, params, max_position_embeddings)
    raise ValueError(
        f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3(
    inv_freq: torch.Tensor, params: Mapping[str, Any], max_position_embeddings: int
) -> torch.Tensor:
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params.get("original_max_position_embeddings", max_position_embeddings))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn(
    dim: int, base: float, params: Mapping[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    original = int(params.get("original_max_position_embeddings", max_position_embeddings))
    factor = params.get("factor")
    factor = max_position_embeddings / original if factor is None else float(factor)
    attention_factor = params.get("attention_factor")
    mscale = params.get("mscale")
    mscale_all_dim = params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(beta_fast)
    high = correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(torch.nn.Module):
    """Applies rotary embeddings (the rotate-half layout) to flattened ``[T, heads, head_dim]``.

    cos/sin tables cover ``max_positions`` and are computed once in float32; lookups by position
    make a mixed batch of prefill chunks and decode tokens one gather.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        params: Mapping[str, Any],
        max_position_embeddings: int,
        max_positions: int,
    ) -> None:
        super().__init__()
        inv_freq, scaling = rope_frequencies(head_dim, params, max_position_embeddings)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def lookup(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[T, 1, head_dim]`` in ``dtype`` for ``positions`` ``[T]``: looked
        up once per step and shared by every layer (see :func:`rotate`)."""
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.lookup(positions, q.dtype)
        return rotate(q, cos, sin), rotate(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]`` by the ``(cos, sin)`` ``[T, 1, head_dim]`` of its
    tokens' positions (from :meth:`RotaryEmbedding.lookup`)."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
