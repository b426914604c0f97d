"""Weight-only quantized linear layers for the CPU, and the loader that builds them.

Two formats, each run by one of torch's CPU weight-only kernels (activations stay in the
model's dtype; weights are expanded inside the kernel):

- ``int8``: per output channel, symmetric: ``w = q * scale``, ``q`` in [-127, 127]
  (``torch._weight_int8pack_mm``).
- ``int4``: groups of 32 input channels per output channel, asymmetric: ``w = q * scale + min``,
  ``q`` in [0, 15], ``scale = (max - min) / 15`` (``torch._weight_int4pack_mm_for_cpu``, whose
  zero point is stored as ``min + 8 * scale``). A layer whose output size is not a multiple of
  16 (a kernel requirement) falls back to int8.

A GGUF file's Q4_1 blocks are exactly this int4 format (groups of 32, ``q * d + m``, with ``m``
the group's minimum and ``d = (max - min) / 15``): quantizing the dequantized weights recovers
the file's codes, so the only change is the rounding of ``d`` and ``m`` to the activation dtype.

The projections a layer runs on the same input are fused into one quantized matrix (q/k/v and
gate/up): one kernel call instead of three or two, and nothing changes numerically (rows are
quantized independently). The output projection (``lm_head``) is not quantized: it is the
layer most sensitive to weight error (per-channel int8 there costs several points of top-1
agreement on the bundled model).

The kernels are fast only with bfloat16 activations (float16 and float32 ones take slow
paths), so a layer casts its input to its kernel dtype and its output back: a float32 model
keeps its residual stream, norms and attention in float32 around bfloat16 matmuls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INT4_GROUP",
    "WEIGHT_QUANT_MODES",
    "Int4Linear",
    "Int8Linear",
    "WeightQuantizer",
    "quantize_linear",
]

WEIGHT_QUANT_MODES = ("int8", "int4")
INT4_GROUP = 32
# From this many rows on (prefill chunks), expanding the weight to float32 and running the
# float32 GEMM beats the weight-only kernels on CPU (measured: benchmarks/RESULTS.md, "Step
# profile"); below it (decode) the kernels win because they read 4-8x fewer bytes.
DENSE_ROWS = 128


class _QuantizedLinear(nn.Module):
    """What both formats share: the choice between the weight-only kernel (decode rows) and
    the float32 GEMM over the expanded weight (prefill chunks), and the bias."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y: torch.Tensor
        if flat.shape[0] >= DENSE_ROWS:
            y = F.linear(flat.to(torch.float32), self.dequantized())
        else:
            y = self.kernel(flat)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def kernel(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ w.T`` ``[M, N]`` by the weight-only kernel (in the kernel's dtype)."""
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` the kernel multiplies by."""
        raise NotImplementedError


class Int8Linear(_QuantizedLinear):
    """``y = x @ (q * scale).T + bias`` with int8 ``q`` ``[N, K]`` and one scale per row."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.to(torch.float32)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.out_features, self.in_features = w.shape
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def kernel(self, flat: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch._weight_int8pack_mm(
            flat.to(self.scale.dtype), self.qweight, self.scale
        )
        return y

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(torch.float32) * self.scale.to(torch.float32)[:, None]


class Int4Linear(_QuantizedLinear):
    """``y = x @ w.T + bias`` with ``w = q * scale + min`` per group of 32 input channels."""

    qweight: torch.Tensor
    codes: torch.Tensor
    scale_zero: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = weight.shape
        if not self.supports(n, k):
            raise ValueError(f"int4 needs out % 16 == 0 and in % {INT4_GROUP} == 0, got {n}x{k}")
        self.out_features, self.in_features = n, k
        groups = weight.to(torch.float32).reshape(n, k // INT4_GROUP, INT4_GROUP)
        low = groups.amin(dim=-1)
        scale = ((groups.amax(dim=-1) - low) / 15).clamp(min=1e-12)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
        codes = codes.reshape(n, k).to(torch.int32)
        self.register_buffer(
            "qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        )
        # The same codes two to a byte (channel 2i low, 2i+1 high) for the dense path: the
        # kernel's packing is opaque.
        pairs = codes.view(n, k // 2, 2)
        self.register_buffer("codes", (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8))
        # [K / 32, N, 2]: the kernel's layout, its zero point being the group's middle code.
        scale_zero = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zero", scale_zero.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    @staticmethod
    def supports(out_features: int, in_features: int) -> bool:
        return out_features % 16 == 0 and in_features % INT4_GROUP == 0

    def kernel(self, flat: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat.to(self.scale_zero.dtype), self.qweight, INT4_GROUP, self.scale_zero
        )
        return y

    def dequantized(self) -> torch.Tensor:
        """``(q - 8) * scale + zero`` with the kernel's own (rounded) scale and zero point."""
        n, k = self.out_features, self.in_features
        out = torch.empty(n, k // 2, 2, dtype=torch.float32, device=self.codes.device)
        torch.bitwise_and(self.codes, 15, out=out[..., 0])
        torch.bitwise_right_shift(self.codes, 4, out=out[..., 1])
        sz = self.scale_zero.to(torch.float32).transpose(0, 1)  # [N, K / 32, 2]
        scale, zero = sz[..., :1], sz[..., 1:]
        groups = out.view(n, k // INT4_GROUP, INT4_GROUP)
        # q * scale + (zero - 8 * scale) in one pass.
        return torch.addcmul(zero - 8 * scale, groups, scale, out=groups).view(n, k)


def quantize_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, mode: str, dtype: torch.dtype
) -> nn.Module:
    """A quantized layer for ``weight`` ``[N, K]`` (any float dtype; quantized from float32)
    in ``mode`` (``int8`` / ``int4``; int4 falls back to int8 for shapes its kernel refuses)."""
    if mode not in WEIGHT_QUANT_MODES:
        raise ValueError(f"weight quantization must be one of {WEIGHT_QUANT_MODES}, got {mode!r}")
    if mode == "int4" and Int4Linear.supports(*weight.shape):
        return Int4Linear(weight, bias, dtype)
    return Int8Linear(weight, bias, dtype)


@dataclass
class _Group:
    """Projections fused into one quantized layer: the parts in output order."""

    target: str  # module path of the fused layer, e.g. "model.layers.3.self_attn.qkv_proj"
    parts: list[str]  # module paths of the original linears, e.g. ".../q_proj"
    mode: str
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    has_bias: bool = False


class WeightQuantizer:
    """Builds a model's quantized layers from its float weights as they are read.

    ``offer(name, tensor)`` takes a state-dict entry; it returns True when the entry belongs to
    a quantized layer (the caller then does not copy it anywhere). Once every part of a fused
    layer has arrived, the layer is quantized and installed (so only one layer's float weights
    are held at a time). ``finish()`` checks nothing is missing. Which linears are quantized
    and fused is described by the model (``LlamaForCausalLM.quantizable_groups``).
    """

    def __init__(
        self,
        groups: list[tuple[str, list[str], bool]],
        mode: str,
        dtype: torch.dtype,
        install: Callable[[str, nn.Module], None],
    ) -> None:
        self.mode = mode
        self.dtype = dtype
        self._install = install
        self._groups: dict[str, _Group] = {}
        self._by_part: dict[str, _Group] = {}
        for target, parts, has_bias in groups:
            g = _Group(target, parts, mode, has_bias=has_bias)
            self._groups[target] = g
            for p in parts:
                self._by_part[p] = g

    def offer(self, name: str, tensor: torch.Tensor) -> bool:
        module, _, kind = name.rpartition(".")
        group = self._by_part.get(module)
        if group is None or kind not in ("weight", "bias"):
            return False
        (group.weights if kind == "weight" else group.biases)[module] = tensor
        if len(group.weights) == len(group.parts) and (
            not group.has_bias or len(group.biases) == len(group.parts)
        ):
            self._build(group)
        return True

    def _build(self, group: _Group) -> None:
        weight = torch.cat([group.weights[p].to(torch.float32) for p in group.parts])
        bias = torch.cat([group.biases[p] for p in group.parts]) if group.has_bias else None
        self._install(group.target, quantize_linear(weight, bias, group.mode, self.dtype))
        del self._groups[group.target]
        for p in group.parts:
            del self._by_part[p]

    def finish(self) -> None:
        """Raise ValueError naming the quantized layers whose weights never arrived."""
        if self._groups:
            missing = sorted(self._groups)
            raise ValueError(f"weights missing for quantized layers: {', '.join(missing[:5])}")
