"""Triton kernels against the torch path (interpreted on the CPU, compiled on a GPU).

Codes may differ by one where float32 division rounds a value on a rounding edge differently.
The default run covers a pairwise subset of the case matrix; the full matrix is marked slow.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import kvquant
from kvquant.triton_kernels import attention_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AXES: dict[str, list[Any]] = {
    "bits": [0, 8, 4],
    "block_size": [16, 64],
    "group": [1, 3, 4],
    "head_dim": [64, 128],
    "dtype": DTYPES,
    "splits": [1, 3],
}
SEQ_LENS = [37, 70, 5, 1, 20]
QUERY_LENS = [37, 13, 1, 1, 0]
ATOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def pairwise(axes: dict[str, list[Any]]) -> list[tuple[object, ...]]:
    """A small set of cases covering every pair of values of every two axes (greedy)."""
    names = list(axes)
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(len(axes[names[i]]))
        for b in range(len(axes[names[j]]))
    }
    all_cases = list(itertools.product(*(range(len(axes[n])) for n in names)))
    chosen: list[tuple[int, ...]] = []
    while uncovered:
        best = max(
            all_cases,
            key=lambda c: sum(
                (i, c[i], j, c[j]) in uncovered for i, j in itertools.combinations(range(len(c)), 2)
            ),
        )
        chosen.append(best)
        uncovered -= {
            (i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(best)), 2)
        }
    return [tuple(axes[n][k] for n, k in zip(names, c, strict=True)) for c in chosen]


PAIRWISE = pairwise(AXES)
FULL = [c for c in itertools.product(*AXES.values()) if c not in PAIRWISE]


def case_id(c: tuple[object, ...]) -> str:
    bits, block, group, dim, dtype, splits = c
    return f"bits{bits}-bs{block}-g{group}-d{dim}-{str(dtype).removeprefix('torch.')}-s{splits}"


CASES = [pytest.param(*c, id=case_id(c)) for c in PAIRWISE] + [
    pytest.param(*c, marks=pytest.mark.slow, id=case_id(c)) for c in FULL
]


def test_pairwise_covers_every_pair() -> None:
    names = list(AXES)
    for i, j in itertools.combinations(range(len(names)), 2):
        seen = {(c[i], c[j]) for c in PAIRWISE}
        assert len(seen) == len(AXES[names[i]]) * len(AXES[names[j]])
    assert len(PAIRWISE) < 16


def repoison(cache: kvquant.KVCache, layer: int, slots: torch.Tensor) -> None:
    for data, sz in (
        (cache.k[layer], cache.k_scale_zero[layer]),
        (cache.v[layer], cache.v_scale_zero[layer]),
    ):
        flat = data.view(-1, cache.num_kv_heads, data.shape[-1])
        flat[slots] = float("nan") if sz is None else 0x5A
        if sz is not None:
            sz.view(-1, cache.num_kv_heads, 2)[slots] = float("nan")


@pytest.mark.parametrize(("bits", "block_size", "group", "head_dim", "dtype", "splits"), CASES)
def test_write_and_attention_match_torch(
    ref: SimpleNamespace,
    bits: int,
    block_size: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    splits: int,
) -> None:
    sc = ref.build(bits, block_size, group, head_dim, dtype, SEQ_LENS, QUERY_LENS, backend="torch")
    torch_cache, layer = sc.cache, sc.layer
    # A twin cache: same poison everywhere, torch's values removed from the written slots.
    twin = kvquant.KVCache(
        2, torch_cache.num_blocks, block_size, 2, head_dim, bits, dtype, torch_cache.device
    )
    pairs = list(
        zip(
            torch_cache.k + torch_cache.v + torch_cache.k_scale_zero + torch_cache.v_scale_zero,
            twin.k + twin.v + twin.k_scale_zero + twin.v_scale_zero,
            strict=True,
        )
    )
    for a, b in pairs:
        if a is not None and b is not None:
            b.copy_(a)
    written = sc.slot_mapping[sc.slot_mapping >= 0]
    repoison(twin, layer, written)
    kvquant.write(twin, layer, sc.k, sc.v, sc.slot_mapping, backend="triton")
    for a, b in pairs:
        if a is None or b is None:
            continue
        if a.dtype == torch.uint8:  # codes: equal up to one step (nibble-wise for bits 4)
            ai, bi = a.to(torch.int16), b.to(torch.int16)
            if bits == 4:
                ai = torch.cat([ai & 0xF, ai >> 4], -1)
                bi = torch.cat([bi & 0xF, bi >> 4], -1)
            assert (ai - bi).abs().max() <= 1
            assert (ai != bi).float().mean() < 0.01
        elif a.shape[-1] == 2 and bits:  # (scale, min), and the poison of unwritten slots
            torch.testing.assert_close(b, a, rtol=1e-6, atol=0, equal_nan=True)
        else:  # bits 0: stored values, and NaN poison elsewhere
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)

    seq_lens, query_lens = sc.lens()
    args = (torch_cache, layer, sc.block_tables, seq_lens, query_lens, sc.scale)
    expect = kvquant.attention(sc.q, *args, backend="torch")
    got = attention_triton(sc.q, *args, num_splits=splits)
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expect.float(), atol=ATOL[dtype], rtol=0)


def test_auto_backend_and_strided_q(ref: SimpleNamespace) -> None:
    """A q that is a view of a fused qkv projection (strided rows) reads correctly."""
    sc = ref.build(8, 16, 2, 64, torch.float32, [20, 9], [4, 1])
    seq_lens, query_lens = sc.lens()
    qkv = torch.randn(5, 4 + 2 + 2, 64, device=sc.q.device)
    q = qkv[:, :4]
    assert not q.is_contiguous()
    args = (sc.cache, sc.layer, sc.block_tables, seq_lens, query_lens, sc.scale)
    expect = kvquant.attention(q.contiguous(), *args, backend="torch")
    torch.testing.assert_close(
        kvquant.attention(q, *args, backend="triton"), expect, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(kvquant.attention(q, *args), expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_dequantize_match_torch(dtype: torch.dtype, bits: int) -> None:
    big = 6.0e4 if dtype == torch.float16 else 1.0e30
    x = torch.randn(3, 7, 32, dtype=torch.float64) * 5
    x[0, 0] = 2.5  # constant row
    x[0, 1, :4] = torch.tensor([-big, big, big / 3, 0.0])
    x = x.to(dtype).to(torch.device("cuda") if torch.cuda.is_available() else "cpu")
    c_t, sz_t = kvquant.quantize(x, bits, backend="torch")
    c_k, sz_k = kvquant.quantize(x, bits, backend="triton")
    torch.testing.assert_close(sz_k, sz_t, rtol=1e-6, atol=0)
    lo_t, lo_k = c_t.to(torch.int16), c_k.to(torch.int16)
    if bits == 4:
        lo_t = torch.cat([lo_t & 0xF, lo_t >> 4], -1)
        lo_k = torch.cat([lo_k & 0xF, lo_k >> 4], -1)
    assert (lo_t - lo_k).abs().max() <= 1
    for out in (torch.float32, dtype):
        d_t = kvquant.dequantize(c_t, sz_t, bits, out, backend="torch")
        d_k = kvquant.dequantize(c_t, sz_t, bits, out, backend="triton")
        assert d_k.dtype == out and torch.isfinite(d_k.float()).all()
        torch.testing.assert_close(d_k, d_t, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_write_strided_views(bits: int) -> None:
    """k/v that are views of a fused kv projection are written like contiguous copies."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    kv = torch.randn(6, 4, 64, device=dev)
    k, v = kv[:, :2], kv[:, 2:]
    slots = torch.tensor([5, -1, 0, 33, 17, 2], device=dev)
    caches = [kvquant.KVCache(1, 3, 16, 2, 64, bits, torch.float32, dev) for _ in range(2)]
    kvquant.write(caches[0], 0, k.contiguous(), v.contiguous(), slots, backend="torch")
    kvquant.write(caches[1], 0, k, v, slots, backend="triton")
    a, b = caches
    for x, y in zip(
        a.k + a.v + a.k_scale_zero + a.v_scale_zero,
        b.k + b.v + b.k_scale_zero + b.v_scale_zero,
        strict=True,
    ):
        if x is not None and y is not None:
            if x.dtype == torch.uint8:
                xi, yi = x.to(torch.int16), y.to(torch.int16)
                if bits == 4:
                    xi = torch.cat([xi & 0xF, xi >> 4], -1)
                    yi = torch.cat([yi & 0xF, yi >> 4], -1)
                assert (xi - yi).abs().max() <= 1
            else:
                torch.testing.assert_close(y, x, rtol=1e-6, atol=0)
