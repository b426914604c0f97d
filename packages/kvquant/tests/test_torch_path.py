"""The torch write/attention path against float64 references (the full case matrix)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

import kvquant
from kvquant import attention_plan, torch_ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Prefill from scratch, a chunk after cached context, decode tokens, an empty query, and a
# sequence ending exactly on a block boundary.
SEQ_LENS = [37, 70, 5, 64, 1, 20]
QUERY_LENS = [37, 13, 1, 1, 1, 0]
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

MATRIX = list(itertools.product([0, 8, 4], [16, 64], [1, 3, 4], [64, 128], DTYPES))


def slot_bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so NaN poison compares equal to itself."""
    return t.contiguous().view(torch.uint8).clone()


@pytest.mark.parametrize(("bits", "block_size", "group", "head_dim", "dtype"), MATRIX)
def test_write_then_attention(
    ref: SimpleNamespace,
    bits: int,
    block_size: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
) -> None:
    sc = ref.build(bits, block_size, group, head_dim, dtype, SEQ_LENS, QUERY_LENS)
    cache, layer = sc.cache, sc.layer
    keep = sc.slot_mapping >= 0
    slots = sc.slot_mapping[keep]
    # Stored values reconstruct the written ones within half a step (+ 16-bit scale rounding).
    for which, src in (("k", sc.k[keep]), ("v", sc.v[keep])):
        got = ref.values(cache, layer, which, slots)
        x = src.to(torch.float64)
        if bits == 0:
            assert torch.equal(got, x)
        else:
            top = (1 << bits) - 1
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            sz = (cache.k_scale_zero if which == "k" else cache.v_scale_zero)[layer]
            s = sz.reshape(-1, cache.num_kv_heads, 2)[slots][..., :1].to(torch.float64)
            bound = 0.5 * s + top * ((hi - lo) / top - s).abs() + 1e-6 * x.abs().amax()
            assert ((got - x).abs() <= bound).all()
    # Attention equals dense float64 attention over the de-quantized values.
    seq_lens, query_lens = sc.lens()
    out = kvquant.attention(
        sc.q, cache, layer, sc.block_tables, seq_lens, query_lens, sc.scale, backend="torch"
    )
    assert out.shape == sc.q.shape and out.dtype == dtype
    expect = ref.attention(sc.q, cache, layer, sc.block_tables, SEQ_LENS, QUERY_LENS, sc.scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.to(torch.float64), expect, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_untouched_slots_and_other_layer(ref: SimpleNamespace, bits: int) -> None:
    """A write changes exactly its slots of its layer; padding tokens (-1) go nowhere."""
    sc = ref.build(bits, 16, 1, 64, torch.float16, [10, 3], [10, 3], n_pad=0)
    cache = sc.cache
    before = [slot_bits(t) for t in cache.k + cache.v]
    before_sz = [slot_bits(t) for t in cache.k_scale_zero + cache.v_scale_zero if t is not None]
    k = torch.randn(5, 2, 64, dtype=torch.float16)
    slots = torch.tensor([3, -1, 17, -1, 40], dtype=torch.int64)
    kvquant.write(cache, 0, k, k.clone(), slots)
    written = torch.zeros(cache.num_slots, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    after = [slot_bits(t) for t in cache.k + cache.v]
    after_sz = [slot_bits(t) for t in cache.k_scale_zero + cache.v_scale_zero if t is not None]
    for i, (b, a) in enumerate(zip(before + before_sz, after + after_sz, strict=True)):
        rows_b = b.reshape(cache.num_slots, -1)
        rows_a = a.reshape(cache.num_slots, -1)
        is_layer0 = i % cache.num_layers == 0
        assert torch.equal(rows_b[~written], rows_a[~written])
        if is_layer0:
            assert not torch.equal(rows_b[written], rows_a[written])
        else:
            assert torch.equal(rows_b, rows_a)
    got = ref.values(cache, 0, "k", slots[slots >= 0])
    torch.testing.assert_close(
        got, k[slots >= 0].double(), atol={0: 0.0, 8: 0.02, 4: 0.3}[bits], rtol=0.0
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_attention_constant_and_extreme_values(
    ref: SimpleNamespace, bits: int, dtype: torch.dtype, backend: str
) -> None:
    """Constant rows and huge ranges stay finite and match the float64 reference."""
    dev = ref.device()
    big = 6.0e4 if dtype == torch.float16 else 1.0e30
    cache = kvquant.KVCache(1, 4, 16, 1, 64, bits, dtype, dev)
    n = 40
    k = torch.zeros(n, 1, 64, dtype=torch.float64)
    k[::2] = 7.0  # constant rows
    k[1::4, :, :8] = big  # extreme range
    k[3::4, :, :8] = -big
    v = torch.linspace(-1e4, 1e4, n * 64, dtype=torch.float64).reshape(n, 1, 64)
    v[::3] = 5.0  # constant rows
    slots = torch.arange(n, dtype=torch.int64, device=dev)
    kvquant.write(cache, 0, k.to(dtype).to(dev), v.to(dtype).to(dev), slots, backend=backend)  # type: ignore[arg-type]
    q = torch.full((n, 2, 64), 0.1 / big, dtype=torch.float64).to(dtype).to(dev)
    bt = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=dev)
    lens = torch.tensor([n], dtype=torch.int32, device=dev)
    out = kvquant.attention(q, cache, 0, bt, lens, lens, 0.125, backend=backend)  # type: ignore[arg-type]
    assert torch.isfinite(out).all()
    expect = ref.attention(q, cache, 0, bt, [n], [n], 0.125)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.cpu().double(), expect, rtol=0, atol=1e4 * tol)


def test_quantized_attention_close_to_exact(ref: SimpleNamespace) -> None:
    """End to end: int8 barely moves attention, int4 moves it more (but boundedly)."""
    errs = {}
    for bits in (0, 8, 4):
        sc = ref.build(bits, 16, 2, 64, torch.float32, [50, 30], [50, 1], seed=3)
        seq_lens, query_lens = sc.lens()
        out = kvquant.attention(
            sc.q, sc.cache, sc.layer, sc.block_tables, seq_lens, query_lens, sc.scale
        )
        if bits == 0:
            exact = out.double()
        errs[bits] = ((out.double() - exact).norm() / exact.norm()).item()
    # int4 steps are 17x coarser than int8 steps; outlier channels widen both.
    assert errs[8] < 0.03 and 4 * errs[8] < errs[4] < 0.5, errs


def test_grouping_bounds_memory_without_changing_results(
    ref: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a tiny score budget every sequence is attended alone; results are unchanged."""
    sc = ref.build(8, 16, 3, 64, torch.float32, SEQ_LENS, QUERY_LENS)
    seq_lens, query_lens = sc.lens()
    args = (sc.q, sc.cache, sc.layer, sc.block_tables, seq_lens, query_lens, sc.scale)
    whole = kvquant.attention(*args, backend="torch")
    monkeypatch.setattr(attention_plan, "_MAX_GROUP_ELEMENTS", 1)
    assert attention_plan._split([0, 1, 2], [3, 1, 1], [9, 9, 9], 4, 8) == [[0], [1], [2]]
    split = kvquant.attention(*args, backend="torch")
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)
    expect = ref.attention(
        sc.q, sc.cache, sc.layer, sc.block_tables, SEQ_LENS, QUERY_LENS, sc.scale
    )
    torch.testing.assert_close(split.double(), expect, atol=2e-5, rtol=0)


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_blocks_are_read_once_with_the_same_result(
    ref: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, bits: int, dtype: torch.dtype
) -> None:
    """Sequences whose block tables start with the same blocks (a cached system prompt) take
    the shared-prefix path, and it agrees with float64 attention and with the dense path."""
    seq_lens, query_lens = [70, 45, 50, 64], [1, 1, 5, 3]  # two decodes, two chunks
    sc = ref.build(bits, 16, 3, 64, dtype, seq_lens, query_lens)
    tables = sc.block_tables.clone()
    tables[:, :2] = tables[0, :2]  # every sequence starts with sequence 0's first two blocks
    sl, ql = sc.lens()
    calls: list[int] = []
    shared_path = torch_ops._attend_shared_prefix

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return shared_path(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch_ops, "_attend_shared_prefix", spy)
    out = kvquant.attention(sc.q, sc.cache, sc.layer, tables, sl, ql, sc.scale, backend="torch")
    assert len(calls) == 2  # the decode group and the chunk group
    expect = ref.attention(sc.q, sc.cache, sc.layer, tables, seq_lens, query_lens, sc.scale)
    torch.testing.assert_close(out.to(torch.float64), expect, atol=ATOL[dtype], rtol=0)
    monkeypatch.setattr(attention_plan, "_shared_prefix_blocks", lambda *a: 0)
    dense = kvquant.attention(sc.q, sc.cache, sc.layer, tables, sl, ql, sc.scale, backend="torch")
    assert len(calls) == 2
    torch.testing.assert_close(out, dense, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)


def test_shared_prefix_detection() -> None:
    t = torch.tensor([[4, 5, 6, 7], [4, 5, 9, 8], [4, 5, 6, 1]])
    assert attention_plan._shared_prefix_blocks(t, [1, 1, 1], [64, 64, 64], 16) == 2
    # Blocks a query could still be inside are never treated as shared.
    assert attention_plan._shared_prefix_blocks(t, [1, 40, 1], [64, 64, 64], 16) == 1
    assert attention_plan._shared_prefix_blocks(t[:1], [1], [64], 16) == 0
    assert attention_plan._shared_prefix_blocks(t, [1, 1, 1], [10, 64, 64], 16) == 0


def test_one_plan_serves_every_layer(ref: SimpleNamespace) -> None:
    """A plan built once for a batch gives each layer the result of planning in that call."""
    sc = ref.build(8, 16, 3, 64, torch.float32, SEQ_LENS, QUERY_LENS)
    kvquant.write(sc.cache, 0, sc.k.flip(0), sc.v, sc.slot_mapping)  # layer 0: other keys
    sl, ql = sc.lens()
    plan = kvquant.plan_for(sc.cache, sc.block_tables, sl, ql, sc.q.shape[1])
    assert plan is not None
    for layer in range(sc.cache.num_layers):
        args = (sc.q, sc.cache, layer, sc.block_tables, sl, ql, sc.scale)
        planned = kvquant.attention(*args, backend="torch", plan=plan)
        torch.testing.assert_close(planned, kvquant.attention(*args, backend="torch"))
        expect = ref.attention(sc.q, sc.cache, layer, sc.block_tables, SEQ_LENS, QUERY_LENS, sc.scale)
        torch.testing.assert_close(planned.double(), expect, atol=2e-5, rtol=0)


def test_plan_layouts() -> None:
    """A lone decode token needs no mask; a decode batch or one chunk needs no output scatter;
    ragged batches mask what is past each sequence."""
    tables = torch.tensor([[3, 1, 2], [0, 4, 5]], dtype=torch.int32)

    def plan(seq: list[int], q: list[int]) -> kvquant.AttentionPlan:
        return kvquant.plan_attention(
            tables[: len(seq)], torch.tensor(seq), torch.tensor(q), 4, 2, 8
        )

    lone = plan([10], [1])
    assert lone.in_order and lone.groups[0].mask is None and lone.groups[0].invalid is None
    assert lone.groups[0].slots.tolist() == [[12, 13, 14, 15, 4, 5, 6, 7, 8, 9]]
    batch = plan([10, 7], [1, 1])
    assert batch.in_order and batch.groups[0].invalid is not None
    assert batch.groups[0].mask is not None and batch.groups[0].mask.sum().item() == 17
    mixed = plan([10, 7], [1, 3])
    assert not mixed.in_order and len(mixed.groups) == 2
    with pytest.raises(ValueError, match="query_len"):
        plan([3], [4])
