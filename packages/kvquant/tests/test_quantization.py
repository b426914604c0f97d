"""quantize / dequantize (torch) against float64: error bounds, format, edge rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kvquant
from kvquant.quantization import EPS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def error_bound(x: torch.Tensor, sz: torch.Tensor, bits: int) -> torch.Tensor:
    """Half a step of the stored scale, plus what 16-bit storage of scale and min costs."""
    top = (1 << bits) - 1
    x64 = x.to(torch.float64)
    lo, hi = x64.amin(-1, keepdim=True), x64.amax(-1, keepdim=True)
    true_scale = torch.clamp((hi - lo) / top, min=EPS)
    s = sz[..., :1].to(torch.float64)
    m = sz[..., 1:].to(torch.float64)
    # float32 arithmetic in the kernel: a few ulps of the magnitudes involved.
    fp = 4 * torch.finfo(torch.float32).eps * (x64.abs().amax(-1, keepdim=True) + top * s)
    return 0.5 * s + top * (true_scale - s).abs() + (lo - m).abs() + fp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_reconstruction_within_half_step(dtype: torch.dtype, bits: int, head_dim: int) -> None:
    x = (torch.randn(64, 3, head_dim, dtype=torch.float64) * 3 + 1).to(dtype)
    x[:, :, 5] *= 20  # an outlier channel
    codes, sz = kvquant.quantize(x, bits)
    assert codes.dtype == torch.uint8
    assert codes.shape == (64, 3, head_dim // 2 if bits == 4 else head_dim)
    assert sz.shape == (64, 3, 2)
    assert sz.dtype == (torch.float16 if dtype == torch.float16 else torch.float32)
    x_hat = kvquant.dequantize(codes, sz, bits, torch.float64)
    err = (x_hat - x.to(torch.float64)).abs()
    assert (err <= error_bound(x, sz, bits)).all()
    # The step is as fine as the format promises (not a degenerate scale).
    top = (1 << bits) - 1
    rng = x.to(torch.float64).amax(-1) - x.to(torch.float64).amin(-1)
    assert torch.allclose(sz[..., 0].to(torch.float64), rng / top, rtol=2e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_formula_and_layout_exact(bits: int) -> None:
    """Codes follow floor((x - min)/scale + 0.5) with the stored scale; int4 nibble order."""
    x = torch.randn(50, 16, dtype=torch.float32)
    codes, sz = kvquant.quantize(x, bits)
    s, m = sz[:, :1].double(), sz[:, 1:].double()
    top = (1 << bits) - 1
    expect = torch.clamp(torch.floor((x.double() - m) / s + 0.5), 0, top).to(torch.int64)
    got = codes.to(torch.int64)
    if bits == 4:
        got = torch.cat([got & 0xF, got >> 4], dim=-1)
    # float32 vs float64 division may flip a value sitting exactly on a rounding edge.
    assert (got - expect).abs().max() <= 1
    assert (got != expect).float().mean() < 0.01
    # min and max land on codes 0 and top.
    assert (got.amin(-1) == 0).all() and (got.amax(-1) == top).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_constant_and_extreme_rows(dtype: torch.dtype, bits: int) -> None:
    big = 6.0e4 if dtype == torch.float16 else 1.0e30
    rows = torch.tensor(
        [
            [0.0] * 8,
            [3.5] * 8,
            [-big] * 8,
            [-big, big] + [0.0] * 6,
            [big, big * 0.5, -big * 0.25, 1.0, -1.0, 0.0, big, -big],
            [1e-7, 2e-7, 0.0, -1e-7, 0.0, 0.0, 0.0, 1e-7],
        ],
        dtype=torch.float64,
    ).to(dtype)
    codes, sz = kvquant.quantize(rows, bits)
    assert torch.isfinite(sz.float()).all()
    x_hat = kvquant.dequantize(codes, sz, bits, torch.float64)
    assert torch.isfinite(x_hat).all()
    assert ((x_hat - rows.double()).abs() <= error_bound(rows, sz, bits)).all()
    # Constant rows come back exactly (code 0, stored min).
    assert torch.equal(x_hat[0], rows[0].double()) and torch.equal(x_hat[1], rows[1].double())
    assert torch.isfinite(kvquant.dequantize(codes, sz, bits, dtype).float()).all()


def test_bits_zero_and_bad_inputs() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits"):
        kvquant.quantize(x, 0)
    with pytest.raises(ValueError, match="bits"):
        kvquant.quantize(x, 3)
    with pytest.raises(ValueError, match="even"):
        kvquant.quantize(torch.randn(4, 7), 4)
    with pytest.raises(ValueError, match="floating"):
        kvquant.quantize(torch.ones(4, 8, dtype=torch.int32), 8)
    codes, sz = kvquant.quantize(x, 8)
    with pytest.raises(ValueError, match="uint8"):
        kvquant.dequantize(codes.to(torch.int32), sz, 8)
    with pytest.raises(ValueError, match="shape"):
        kvquant.dequantize(codes, sz[:2], 8)
    with pytest.raises(ValueError, match="bits"):
        kvquant.dequantize(codes, sz, 0)
    with pytest.raises(ValueError, match="backend"):
        kvquant.quantize(x, 8, backend="cuda")  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.sampled_from([2, 6, 64])),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    bits=st.sampled_from([8, 4]),
    half=st.booleans(),
)
def test_error_bound_property(x: np.ndarray, bits: int, half: bool) -> None:
    t = torch.from_numpy(x)
    if half:
        t = t.to(torch.float16)
        assume(bool(torch.isfinite(t).all()))  # values past 65504 become inf: not a valid input
    codes, sz = kvquant.quantize(t, bits)
    x_hat = kvquant.dequantize(codes, sz, bits, torch.float64)
    assert ((x_hat - t.to(torch.float64)).abs() <= error_bound(t, sz, bits)).all()
