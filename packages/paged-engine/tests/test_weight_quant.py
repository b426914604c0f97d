"""Weight-only quantized linears against float references, the loader that builds them, and the
quality guard of the CPU defaults on small shapes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from paged_engine import EngineConfig, LLMEngine
from paged_engine.config import cpu_weight_quant_kernels
from paged_engine.weight_quant import (
    DENSE_ROWS,
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    WeightQuantizer,
    quantize_linear,
)

pytestmark = pytest.mark.skipif(
    not cpu_weight_quant_kernels(), reason="this torch has no CPU weight-only kernels"
)


def _ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 5, DENSE_ROWS])  # kernel path and dense path
def test_quantized_linear_multiplies_by_its_dequantized_weight(
    cls: type[torch.nn.Module], rows: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen) * 0.05
    b = torch.randn(48, generator=gen)
    layer = cls(w, b, torch.bfloat16)
    x = torch.randn(rows, 96, generator=gen)
    deq = layer.dequantized()  # type: ignore[operator]
    # The kernel's weight is within half a quantization step of the original, plus the
    # rounding of its scale (and zero point) to bfloat16: 2**-8 of the weight's range.
    groups = w.view(48, -1, INT4_GROUP)
    span = (groups.amax(-1) - groups.amin(-1)).repeat_interleave(INT4_GROUP, 1)
    step = w.abs().amax(1, keepdim=True) / 127 if cls is Int8Linear else span / 15
    bound = 0.5 * step + 2 * (w.abs().amax(1, keepdim=True) + step) * 2**-8 + 1e-6
    assert bool(((deq - w).abs() <= bound).all())
    for dtype in (torch.bfloat16, torch.float32):  # a float32 model casts around the kernel
        y = layer(x.to(dtype))
        assert y.dtype == dtype and y.shape == (rows, 48)
        ref = _ref(x.to(dtype).float(), deq, b)
        err = (y.double() - ref).norm() / ref.norm()
        assert err < 1e-2, err  # bfloat16 activations


def test_int4_recovers_q4_1_codes_exactly() -> None:
    """Weights that are Q4_1 blocks (q * d + m, q in 0..15 with both ends used, fp16 d and m)
    come back with the same codes; only d and m are rounded (to bfloat16)."""
    gen = torch.Generator().manual_seed(1)
    n, k = 32, 128
    q = torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's Q4_1 maps each group's min to 0, max to 15
    d = (torch.rand(n, k // INT4_GROUP, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (-8 * d + torch.randn(n, k // INT4_GROUP, 1, generator=gen) * 1e-3).half().float()
    w = (q * d + m).view(n, k)
    layer = Int4Linear(w, None, torch.bfloat16)
    codes = torch.stack([layer.codes & 15, layer.codes >> 4], -1).view(n, k // INT4_GROUP, -1)
    assert torch.equal(codes.long(), q)
    # The only change: scale and zero rounded to bfloat16 (relative 2**-8 at most).
    err = (layer.dequantized() - w).abs().view(n, k // INT4_GROUP, -1)
    assert bool((err <= 16 * d * 2**-8 + 2e-5).all())


def test_shapes_the_int4_kernel_refuses_fall_back_to_int8() -> None:
    assert isinstance(quantize_linear(torch.randn(40, 64), None, "int4", torch.bfloat16), Int8Linear)
    assert isinstance(quantize_linear(torch.randn(48, 64), None, "int4", torch.bfloat16), Int4Linear)
    with pytest.raises(ValueError, match="int2"):
        quantize_linear(torch.randn(48, 64), None, "int2", torch.bfloat16)


def test_quantizer_fuses_parts_in_order_and_reports_missing() -> None:
    installed: dict[str, torch.nn.Module] = {}
    quantizer = WeightQuantizer(
        [("a.qkv", ["a.q", "a.k"], False), ("a.o", ["a.o"], True)],
        "int8",
        torch.float32,
        installed.__setitem__,
    )
    wq, wk = torch.randn(16, 32), torch.randn(8, 32)
    assert not quantizer.offer("a.norm.weight", torch.ones(32))
    assert quantizer.offer("a.k.weight", wk) and "a.qkv" not in installed
    assert quantizer.offer("a.q.weight", wq)
    fused = installed["a.qkv"]
    assert isinstance(fused, Int8Linear)
    torch.testing.assert_close(
        fused.dequantized(), Int8Linear(torch.cat([wq, wk]), None, torch.float32).dequantized()
    )
    assert quantizer.offer("a.o.weight", torch.randn(32, 32))
    with pytest.raises(ValueError, match=r"a\.o"):
        quantizer.finish()  # its bias never came
    quantizer.offer("a.o.bias", torch.zeros(32))
    quantizer.finish()


def _logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    return torch.cat([lg for _, lg in engine.score(prompt)])


@pytest.mark.parametrize("weight_quant", ["int8", "int4", "auto"])
def test_quality_guard_on_small_shapes(
    tiny_model: Callable[[str], tuple[Path, Any]], weight_quant: str
) -> None:
    """bf16 compute with quantized weights stays close to the exact float32 path: small KL, and
    the same top-1 token wherever the exact path is decided (a clear margin)."""
    path, _ = tiny_model("qwen2-yarn")  # biases on q/k/v: the fused layer carries them
    common: dict[str, Any] = {"model": str(path), "device": "cpu", "num_blocks": 64}
    exact = LLMEngine(EngineConfig(**common, dtype="float32", weight_quant=None))
    fast = LLMEngine(EngineConfig(**common, dtype="bfloat16", weight_quant=weight_quant))
    assert fast.weight_quant in ("int8", "int4")
    prompt = [(i * 37) % 128 for i in range(60)]
    ref, got = _logits(exact, prompt), _logits(fast, prompt)
    logp_ref, logp = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean()
    assert kl < 0.01, kl
    top2 = ref.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 0.05
    assert bool((ref.argmax(-1) == got.argmax(-1))[decided].all())
