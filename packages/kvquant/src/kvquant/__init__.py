"""kvquant: the quantized paged-KV format and the kernels that write and read it.

K/V are stored per token and head as bits 0 (the cache dtype), 8 (uint8) or 4 (two codes per
byte) with an asymmetric ``(scale, min)`` (int4 keys optionally per block and channel, with
an exact residual for a block not yet full); ``write`` quantizes on the way in and ``attention``
de-quantizes inside the kernel. Triton runs on CUDA tensors, vectorized torch on the CPU.
"""

from .api import Backend, attention, dequantize, plan_for, quantize, resolve_backend, write
from .attention_plan import AttentionPlan, plan_attention
from .kv_cache import CACHE_DTYPES, INT4_LAYOUTS, KVCache
from .quantization import (
    EPS,
    SUPPORTED_BITS,
    dequantize_channels,
    quantize_channels,
    scale_zero_dtype,
)

__version__ = "0.1.0"

__all__ = [
    "CACHE_DTYPES",
    "EPS",
    "INT4_LAYOUTS",
    "SUPPORTED_BITS",
    "AttentionPlan",
    "Backend",
    "KVCache",
    "__version__",
    "attention",
    "dequantize",
    "dequantize_channels",
    "plan_attention",
    "plan_for",
    "quantize",
    "quantize_channels",
    "resolve_backend",
    "scale_zero_dtype",
    "write",
]
