"""The block-channel int4 key layout (keys per block, head and channel; an exact residual for a
block not yet full) against float64 references, written over several steps as an engine does:
blocks that fill mid-chunk, several blocks filled by one chunk, decode tokens, chunks that end
on a block boundary. Torch over the whole matrix; Triton (interpreted on the CPU) on a pairwise
subset, compared with torch and with the reference."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import kvquant

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Per sequence, the chunk sizes of successive steps (0: not scheduled that step).
CHUNKS = [
    [37, 13, 1],  # prefill ending mid-block, a chunk that fills it and more, a decode token
    [5, 1, 1],  # decode into an open block
    [64, 0, 6],  # a chunk ending exactly on a block boundary (no residual), then a new block
    [3, 40, 0],  # a chunk filling several blocks mid-chunk, after a residual
    [20, 0, 0],  # a sequence not scheduled in the last step: its open block stays exact
]


@dataclass
class Written:
    cache: kvquant.KVCache
    keys: list[torch.Tensor]  # per sequence, [len, kvh, D] exact keys (cache dtype)
    tables: torch.Tensor  # int32 [B, W]
    seq_lens: list[int]
    query_lens: list[int]  # the last step's chunks


def write_steps(
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    backend: str,
    dev: torch.device,
    realistic: object,
    chunks: list[list[int]] = CHUNKS,
    kv_heads: int = 2,
    seed: int = 0,
) -> Written:
    """Write every sequence's chunks step by step (residual slot b for sequence b, assigned
    before each step as an engine does) into a cache whose unwritten parts hold garbage."""
    gen = torch.Generator().manual_seed(seed)
    lens = [sum(c) for c in chunks]
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 2
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for nb in need:
        mine, ids = ids[:nb], ids[nb:]
        tables.append(mine + [num_blocks - 1] * (max(need) + 1 - nb))
    cache = kvquant.KVCache(
        2, num_blocks, block_size, kv_heads, head_dim, 4, dtype, dev, "block-channel", len(chunks)
    )
    layer = 1
    cache.k[layer].copy_(torch.randint(0, 256, cache.k[layer].shape, generator=gen).to(torch.uint8))
    sz = cache.k_scale_zero[layer]
    assert sz is not None
    sz.fill_(float("nan"))
    cache.k_residual[layer].fill_(float("nan"))
    keys = [
        realistic(n, kv_heads, head_dim, gen).to(dtype).to(dev)  # type: ignore[operator]
        for n in lens
    ]
    done = [0] * len(chunks)
    for step in range(len(chunks[0])):
        slots, ks, blocks, rslots = [], [], [], []
        for b, ch in enumerate(chunks):
            n = ch[step]
            if n == 0:
                continue
            pos = torch.arange(done[b], done[b] + n)
            row = torch.tensor(tables[b], dtype=torch.int64)
            slots.append(row[pos // block_size] * block_size + pos % block_size)
            ks.append(keys[b][done[b] : done[b] + n])
            done[b] += n
            if done[b] % block_size:
                blocks.append(tables[b][(done[b] - 1) // block_size])
                rslots.append(b)
            slots.append(torch.tensor([-1]))  # padding between sequences, skipped
            ks.append(torch.full((1, kv_heads, head_dim), 1e4, dtype=dtype, device=dev))
        cache.assign_residual(blocks, rslots)
        k = torch.cat(ks)
        kvquant.write(
            cache,
            layer,
            k,
            torch.randn_like(k),
            torch.cat(slots).to(dev),
            backend=backend,  # type: ignore[arg-type]
        )
    bt = torch.tensor(tables, dtype=torch.int32, device=dev)
    return Written(cache, keys, bt, lens, [c[-1] for c in chunks])


def ref_keys(w: Written, b: int) -> torch.Tensor:
    """Float64 keys sequence ``b``'s attention must see, computed independently: full blocks
    from the stored codes and per-channel (scale, min), the last partial block exact."""
    c, layer, bs = w.cache, 1, w.cache.block_size
    n = w.seq_lens[b]
    out = w.keys[b].cpu().to(torch.float64).clone()
    sz_t = c.k_scale_zero[layer]
    assert sz_t is not None
    for i in range(n // bs):
        blk = int(w.tables[b, i])
        codes = c.k[layer][blk].cpu().to(torch.int64)  # [bs, kvh, D/2]
        q = torch.cat([codes % 16, codes // 16], dim=-1).to(torch.float64)
        sz = sz_t[blk].cpu().to(torch.float64)  # [kvh, D, 2]
        out[i * bs : (i + 1) * bs] = q * sz[None, :, :, 0] + sz[None, :, :, 1]
    return out


def ref_attention(w: Written, q: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    g = q.shape[1] // w.cache.num_kv_heads
    start = 0
    vstart = 0
    for b, (s, n) in enumerate(zip(w.seq_lens, w.query_lens, strict=True)):
        v = values[vstart : vstart + s]
        vstart += s
        if n == 0:
            continue
        k = ref_keys(w, b).repeat_interleave(g, dim=1)
        vv = v.repeat_interleave(g, dim=1)
        qq = q[start : start + n].cpu().to(torch.float64)
        scores = torch.einsum("qhd,khd->hqk", qq, k) * scale
        pos, qpos = torch.arange(s), torch.arange(s - n, s)
        scores = scores.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        out[start : start + n] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vv)
        start += n
    if w.cache.rotates_values:  # stored values are v @ R, R orthonormal and symmetric
        r = w.cache.value_rotation().cpu().to(torch.float64)
        assert torch.allclose(r @ r, torch.eye(r.shape[0], dtype=torch.float64), atol=1e-6)
        out = out @ r
    return out


def values_of(w: Written) -> torch.Tensor:
    """Float64 de-quantized values of every sequence's positions, in batch order (the values
    keep the per-token layout)."""
    c, layer, bs = w.cache, 1, w.cache.block_size
    sz_t = c.v_scale_zero[layer]
    assert sz_t is not None
    out = []
    for b, n in enumerate(w.seq_lens):
        pos = torch.arange(n)
        slots = w.tables[b].cpu().long()[pos // bs] * bs + pos % bs
        codes = c.v[layer].reshape(-1, c.num_kv_heads, c.head_dim // 2)[slots].cpu().to(torch.int64)
        sz = sz_t.reshape(-1, c.num_kv_heads, 2)[slots].cpu().to(torch.float64)
        q = torch.cat([codes % 16, codes // 16], dim=-1).to(torch.float64)
        out.append(q * sz[..., :1] + sz[..., 1:])
    return torch.cat(out)


def check_stored_keys(w: Written) -> None:
    """Every full block's codes reconstruct its exact keys within half a step per channel, with
    scale = (max - min) / 15 over the block's tokens (rounded to the stored dtype)."""
    bs = w.cache.block_size
    for b in range(len(w.seq_lens)):
        x = w.keys[b].cpu().to(torch.float64)
        got = ref_keys(w, b)
        sz_t = w.cache.k_scale_zero[1]
        assert sz_t is not None
        for i in range(w.seq_lens[b] // bs):
            xb = x[i * bs : (i + 1) * bs]
            lo, hi = xb.amin(0), xb.amax(0)  # [kvh, D]
            s = sz_t[int(w.tables[b, i])].cpu().to(torch.float64)[..., 0]
            torch.testing.assert_close(
                s, ((hi - lo) / 15).clamp(min=kvquant.EPS), rtol=2e-3, atol=1e-6
            )
            bound = 0.5 * s + 15 * ((hi - lo) / 15 - s).abs() + 1e-6 * xb.abs().amax()
            assert ((got[i * bs : (i + 1) * bs] - xb).abs() <= bound).all()
        tail = w.seq_lens[b] // bs * bs
        assert torch.equal(got[tail:], x[tail:])  # the open block is exact


TORCH_MATRIX = list(itertools.product([16, 32, 64], [1, 3, 4], [64, 128], DTYPES))


@pytest.mark.parametrize(("block_size", "group", "head_dim", "dtype"), TORCH_MATRIX)
def test_torch_write_steps_then_attention(
    ref: SimpleNamespace, block_size: int, group: int, head_dim: int, dtype: torch.dtype
) -> None:
    dev = ref.device()
    w = write_steps(block_size, head_dim, dtype, "torch", dev, ref.realistic)
    check_stored_keys(w)
    t = sum(w.query_lens)
    q = ref.realistic(t, 2 * group, head_dim, torch.Generator().manual_seed(1), False)
    q = q.to(dtype).to(dev)
    sl = torch.tensor(w.seq_lens, dtype=torch.int32, device=dev)
    ql = torch.tensor(w.query_lens, dtype=torch.int32, device=dev)
    scale = head_dim**-0.5
    out = kvquant.attention(q, w.cache, 1, w.tables, sl, ql, scale, backend="torch")
    assert out.dtype == dtype and torch.isfinite(out).all()
    expect = ref_attention(w, q, values_of(w), scale)
    torch.testing.assert_close(out.cpu().double(), expect, atol=ATOL[dtype], rtol=0)


# Pairwise over block size x group x head_dim x dtype (each pair of values at least once).
TRITON_CASES = [
    (16, 1, 64, torch.float32),
    (16, 3, 128, torch.float16),
    (16, 4, 64, torch.bfloat16),
    (32, 1, 128, torch.bfloat16),
    (32, 3, 64, torch.float32),
    (32, 4, 128, torch.float16),
    (64, 1, 64, torch.float16),
    (64, 3, 128, torch.bfloat16),
    (64, 4, 128, torch.float32),
]


def test_triton_cases_are_pairwise() -> None:
    for i, j in itertools.combinations(range(4), 2):
        values = [
            sorted({str(c[i]) for c in TRITON_CASES}),
            sorted({str(c[j]) for c in TRITON_CASES}),
        ]
        seen = {(str(c[i]), str(c[j])) for c in TRITON_CASES}
        assert len(seen) == len(values[0]) * len(values[1])


@pytest.mark.parametrize(("block_size", "group", "head_dim", "dtype"), TRITON_CASES)
def test_triton_matches_torch_and_reference(
    ref: SimpleNamespace, block_size: int, group: int, head_dim: int, dtype: torch.dtype
) -> None:
    dev = ref.device()
    chunks = [[21, 12, 1], [4, 0, 1], [block_size, 0, 3]]  # small: the interpreter is slow
    wt = write_steps(block_size, head_dim, dtype, "torch", dev, ref.realistic, chunks)
    wk = write_steps(block_size, head_dim, dtype, "triton", dev, ref.realistic, chunks)
    a, b = wt.cache, wk.cache
    ka, kb = a.k[1].to(torch.int16), b.k[1].to(torch.int16)
    ka, kb = torch.cat([ka & 0xF, ka >> 4], -1), torch.cat([kb & 0xF, kb >> 4], -1)
    assert (ka - kb).abs().max() <= 1 and (ka != kb).float().mean() < 0.01
    torch.testing.assert_close(
        b.k_scale_zero[1], a.k_scale_zero[1], rtol=1e-6, atol=0, equal_nan=True
    )
    torch.testing.assert_close(b.k_residual[1], a.k_residual[1], rtol=0, atol=0, equal_nan=True)
    check_stored_keys(wk)

    t = sum(wk.query_lens)
    q = ref.realistic(t, 2 * group, head_dim, torch.Generator().manual_seed(1), False)
    q = q.to(dtype).to(dev)
    sl = torch.tensor(wk.seq_lens, dtype=torch.int32, device=dev)
    ql = torch.tensor(wk.query_lens, dtype=torch.int32, device=dev)
    scale = head_dim**-0.5
    got = kvquant.attention(q, b, 1, wk.tables, sl, ql, scale, backend="triton")
    assert got.dtype == dtype and torch.isfinite(got).all()
    expect = ref_attention(wk, q, values_of(wk), scale)
    torch.testing.assert_close(got.cpu().double(), expect, atol=ATOL[dtype], rtol=0)
    same = kvquant.attention(q, b, 1, wk.tables, sl, ql, scale, backend="torch")
    torch.testing.assert_close(got.float(), same.float(), atol=ATOL[dtype], rtol=0)


def test_quantize_channels_against_float64() -> None:
    x = torch.randn(3, 16, 2, 8, dtype=torch.float64) * 3
    x[0, :, 0, 0] = 1.5  # a constant channel
    for dtype in DTYPES:
        xd = x.to(dtype)
        codes, sz = kvquant.quantize_channels(xd)
        assert codes.shape == (3, 16, 2, 4) and codes.dtype == torch.uint8
        assert sz.shape == (3, 2, 8, 2) and sz.dtype == kvquant.scale_zero_dtype(dtype)
        back = kvquant.dequantize_channels(codes, sz, torch.float64)
        xf = xd.to(torch.float64)
        step = sz[..., 0].to(torch.float64)[:, None]
        assert ((back - xf).abs() <= 0.5 * step * 1.01 + 2e-3 * xf.abs()).all()
        assert torch.equal(back[0, :, 0, 0], xf[0, :, 0, 0])  # constant: code 0, exact min
    with pytest.raises(ValueError, match="even"):
        kvquant.quantize_channels(torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="does not match"):
        kvquant.dequantize_channels(torch.zeros(2, 1, 2, dtype=torch.uint8), torch.zeros(1, 3, 2))


def test_block_channel_beats_token_layout_on_outlier_keys(ref: SimpleNamespace) -> None:
    """The point of the layout: keys with outlier channels lose far less."""
    gen = torch.Generator().manual_seed(5)
    x = ref.realistic(64, 2, 64, gen).to(torch.float32)
    codes, sz = kvquant.quantize(x, 4)
    token_err = (kvquant.dequantize(codes, sz, 4) - x).norm()
    c, s = kvquant.quantize_channels(x.view(4, 16, 2, 64))
    channel_err = (kvquant.dequantize_channels(c, s).view_as(x) - x).norm()
    assert channel_err < 0.5 * token_err


def test_missing_residual_slot_is_an_error() -> None:
    cache = kvquant.KVCache(1, 4, 16, 1, 64, 4, torch.float32, "cpu", "block-channel", 1)
    k = torch.randn(5, 1, 64)
    with pytest.raises(ValueError, match="no residual slot"):
        kvquant.write(cache, 0, k, k, torch.arange(5) + 16, backend="torch")
    # A write that fills its block needs no residual slot.
    kvquant.write(cache, 0, torch.randn(16, 1, 64), torch.randn(16, 1, 64), torch.arange(16))
    with pytest.raises(ValueError, match="block ids"):
        cache.assign_residual([4], [0])
    with pytest.raises(ValueError, match="residual slots"):
        cache.assign_residual([1], [1])
    with pytest.raises(ValueError, match="block-channel"):
        kvquant.KVCache(1, 4, 16, 1, 64, 4, torch.float32, "cpu").assign_residual([0], [0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_and_bytes(dtype: torch.dtype) -> None:
    c = kvquant.KVCache(3, 5, 16, 2, 64, 4, dtype, "cpu", "block-channel", 2)
    sz_dtype = kvquant.scale_zero_dtype(dtype)
    for layer in range(3):
        assert c.k[layer].shape == c.v[layer].shape == (5, 16, 2, 32)
        ksz, vsz = c.k_scale_zero[layer], c.v_scale_zero[layer]
        assert ksz is not None and ksz.shape == (5, 2, 64, 2) and ksz.dtype == sz_dtype
        assert vsz is not None and vsz.shape == (5, 16, 2, 2) and vsz.dtype == sz_dtype
        assert c.k_residual[layer].shape == (2, 16, 2, 64) and c.k_residual[layer].dtype == dtype
    assert c.residual_map.shape == (5,) and (c.residual_map == -1).all()
    tensors = c.k + c.v + c.k_scale_zero + c.v_scale_zero + c.k_residual + [c.residual_map]
    held = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    assert c.total_bytes == held
    assert c.residual_bytes == sum(t.numel() * t.element_size() for t in c.k_residual)
    assert c.bytes_per_block * 5 + c.residual_bytes == held
    assert c.bytes_per_token == c.bytes_per_block / 16


@pytest.mark.parametrize(
    ("block_size", "head_dim", "at_least"),
    [(16, 64, 2.9), (32, 64, 3.3), (64, 64, 3.5), (16, 128, 3.1), (64, 128, 3.6)],
)
def test_capacity_against_float16(block_size: int, head_dim: int, at_least: float) -> None:
    """Per-channel key scales cost ``2 * 2 * head_dim`` bytes per block and head: at block 16
    the layout still holds ~3x the float16 tokens; token-layout int4 and int8 are unchanged."""
    args = (1, 1, block_size, 1, head_dim)
    fp16 = kvquant.KVCache(*args, 0, torch.float16).bytes_per_token
    bc = kvquant.KVCache(*args, 4, torch.float16, "cpu", "block-channel", 1)
    # K: D/2 codes + per-channel (scale, min) / block; V: D/2 codes + (scale, min); map entry.
    expect = head_dim // 2 + 4 * head_dim / block_size + head_dim // 2 + 4 + 4 / block_size
    assert bc.bytes_per_token == expect
    assert fp16 / bc.bytes_per_token >= at_least
    token = kvquant.KVCache(*args, 4, torch.float16).bytes_per_token
    assert token == 2 * (head_dim // 2 + 4)


def test_from_memory_budget_pays_the_residual_first() -> None:
    args = (16, 2, 64, 4, torch.float16, "cpu", "block-channel", 3)
    one = kvquant.KVCache(2, 1, *args)
    per_block, fixed = one.bytes_per_block, one.residual_bytes
    c = kvquant.KVCache.from_memory_budget(fixed + 7 * per_block + per_block - 1, 2, *args)
    assert c.num_blocks == 7 and c.total_bytes <= fixed + 8 * per_block - 1
    with pytest.raises(ValueError, match="after a key residual"):
        kvquant.KVCache.from_memory_budget(fixed + per_block - 1, 2, *args)


@pytest.mark.parametrize(
    ("bits", "layout", "slots", "match"),
    [
        (8, "block-channel", 1, "layout of bits 4"),
        (4, "block-channel", 0, "residual_slots must be >= 1"),
        (4, "token", 2, "for int4_layout 'block-channel' only"),
        (4, "channel", 0, "int4_layout must be one of"),
    ],
)
def test_bad_layouts(bits: int, layout: str, slots: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        kvquant.KVCache(1, 2, 16, 1, 64, bits, torch.float16, "cpu", layout, slots)


def test_values_are_stored_rotated_and_read_back(ref: SimpleNamespace) -> None:
    """Block-channel values are stored Hadamard-rotated (outlier channels spread over the
    head), which is invisible to attention's callers: with one key, attention returns that
    key's value, and the rotated storage reconstructs it better than plain per-token int4."""
    dev = ref.device()
    gen = torch.Generator().manual_seed(2)
    v = ref.realistic(1, 1, 64, gen).to(torch.float32).to(dev)  # outlier channels
    k = torch.randn(1, 1, 64, generator=gen).to(dev)
    errs = {}
    for layout, slots in (("block-channel", 1), ("token", 0)):
        c = kvquant.KVCache(1, 2, 16, 1, 64, 4, torch.float32, dev, layout, slots)
        assert c.rotates_values == (layout == "block-channel")
        if slots:
            c.assign_residual([1], [0])
        kvquant.write(c, 0, k, v, torch.tensor([16], device=dev))
        one = torch.ones(1, dtype=torch.int32, device=dev)
        bt = torch.tensor([[1]], dtype=torch.int32, device=dev)
        out = kvquant.attention(torch.randn(1, 2, 64, device=dev), c, 0, bt, one, one, 0.125)
        errs[layout] = float((out[0, 0] - v[0, 0]).norm() / v.norm())
        torch.testing.assert_close(out[0, 0], out[0, 1])
    assert errs["block-channel"] < 0.5 * errs["token"], errs
    odd = kvquant.KVCache(1, 2, 16, 1, 48, 4, torch.float32, "cpu", "block-channel", 1)
    assert not odd.rotates_values
    with pytest.raises(ValueError, match="rotate values"):
        odd.value_rotation()
