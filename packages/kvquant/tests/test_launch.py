"""Launch parameters: legal tiles for every shape, and the split-K decision."""

from __future__ import annotations

import itertools

import pytest

from kvquant import launch


def plan(**kw: object) -> launch.AttentionLaunch:
    base: dict[str, object] = dict(
        num_tokens=1, batch=1, group=4, head_dim=128, bits=8, float32=False, max_kv=8192,
        num_kv_heads=8, num_sms=132, arch=90,
    )
    return launch.attention_launch(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("group", "head_dim", "bits", "tokens", "batch", "arch"),
    list(itertools.product([1, 3, 8, 32], [64, 80, 128, 256], [0, 8, 4], [1, 512],
                           [1, 32], [80, 90, None])),
)
def test_tiles_are_legal(
    group: int, head_dim: int, bits: int, tokens: int, batch: int, arch: int | None
) -> None:
    p = plan(group=group, head_dim=head_dim, bits=bits, num_tokens=max(tokens, batch),
             batch=batch, arch=arch, num_sms=None if arch is None else 132)
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    assert p.rows == p.block_q * p.block_g and p.block_g >= group and pow2(p.block_g)
    assert p.rows >= 16 and pow2(p.rows) and p.block_n >= 16 and pow2(p.block_n)
    width = head_dim // 2 if bits == 4 else head_dim
    assert p.block_c >= max(16, width) and pow2(p.block_c)
    assert p.num_warps in (4, 8) and p.num_stages >= 1 and 1 <= p.num_splits <= 16
    decode = max(tokens, batch) <= 2 * batch
    assert p.rows == max(16 if decode else 64, p.block_g)
    if arch is None:
        assert p.num_splits == 1  # off-GPU: nothing to fill


def test_split_k_fills_the_gpu_only_when_it_pays() -> None:
    assert plan(num_tokens=1, batch=1, max_kv=8192).num_splits > 1  # one long sequence
    assert plan(num_tokens=256, batch=256, max_kv=1024).num_splits == 1  # a full batch
    assert plan(num_tokens=1, batch=1, max_kv=64).num_splits == 1  # too short to split
    assert plan(num_splits=3).num_splits == 3  # forced (tests)


@pytest.mark.parametrize(
    ("head_dim", "bits"), list(itertools.product([64, 96, 128, 256], [0, 8, 4]))
)
def test_write_and_dequantize_tiles(head_dim: int, bits: int) -> None:
    w = launch.write_launch(head_dim, bits)
    values = w.block_c * (2 if bits == 4 else 1)
    assert values >= head_dim and w.block_h * values == max(1024, values)
    d = launch.dequantize_launch(head_dim, bits)
    assert d.block_c * (2 if bits == 4 else 1) >= head_dim and d.block_r >= 1


@pytest.mark.parametrize(("head_dim", "block_size"), list(itertools.product([64, 80, 128, 256],
                                                                      [1, 16, 24, 32, 64])))
def test_seal_tile_covers_the_block(head_dim: int, block_size: int) -> None:
    p = launch.seal_launch(head_dim, block_size)
    for n in (p.block_t, p.block_c):
        assert n & (n - 1) == 0  # Triton blocks are powers of two
    assert block_size <= p.block_t < 2 * block_size
    assert head_dim // 2 <= p.block_c < head_dim
    # Two float32 tiles are live: at most 32 values of each per thread (no spills, AOT report).
    assert p.block_t * p.block_c <= 32 * 32 * p.num_warps
