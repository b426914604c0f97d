"""KVCache: layout, byte accounting, budgets, validation."""

from __future__ import annotations

import pytest
import torch

import kvquant


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_layout_and_bytes(bits: int, dtype: torch.dtype) -> None:
    c = kvquant.KVCache(3, 5, 16, 2, 64, bits, dtype, "cpu")
    width = 32 if bits == 4 else 64
    store = dtype if bits == 0 else torch.uint8
    assert len(c.k) == len(c.v) == 3
    for layer in range(3):
        for t in (c.k[layer], c.v[layer]):
            assert t.shape == (5, 16, 2, width) and t.dtype == store
        for sz in (c.k_scale_zero[layer], c.v_scale_zero[layer]):
            if bits == 0:
                assert sz is None
            else:
                assert sz is not None and sz.shape == (5, 16, 2, 2)
                assert sz.dtype == (torch.float16 if dtype == torch.float16 else torch.float32)
    held = sum(t.numel() * t.element_size() for t in c.k + c.v)
    held += sum(
        t.numel() * t.element_size() for t in c.k_scale_zero + c.v_scale_zero if t is not None
    )
    assert c.total_bytes == held
    assert c.bytes_per_token * 5 * 16 == held
    assert c.device == torch.device("cpu") and c.num_slots == 80


@pytest.mark.parametrize(
    ("head_dim", "bits", "expect"),
    [
        (64, 0, 128),
        (64, 8, 68),
        (64, 4, 36),
        (128, 0, 256),
        (128, 8, 132),
        (128, 4, 68),
    ],
)
def test_bytes_per_token_fp16_and_capacity(head_dim: int, bits: int, expect: int) -> None:
    c = kvquant.KVCache(1, 1, 16, 1, head_dim, bits, torch.float16, "cpu")
    assert c.bytes_per_token == 2 * expect
    ratio = (2 * 2 * head_dim) / c.bytes_per_token
    assert ratio >= {0: 1.0, 8: 1.85, 4: 3.4}[bits]


def test_from_memory_budget() -> None:
    one = kvquant.KVCache(2, 1, 16, 2, 64, 8, torch.float16, "cpu").total_bytes
    c = kvquant.KVCache.from_memory_budget(one * 7 + one - 1, 2, 16, 2, 64, 8, torch.float16, "cpu")
    assert c.num_blocks == 7 and c.total_bytes <= one * 8 - 1
    with pytest.raises(ValueError, match=rf"{one - 1} bytes.*needs {one} bytes"):
        kvquant.KVCache.from_memory_budget(one - 1, 2, 16, 2, 64, 8, torch.float16, "cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 2}, "bits"),
        ({"bits": 4, "head_dim": 63}, "even"),
        ({"dtype": torch.int8}, "dtype"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"block_size": -1}, "block_size"),
        ({"num_kv_heads": 1.5}, "num_kv_heads"),
    ],
)
def test_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "num_layers": 1,
        "num_blocks": 2,
        "block_size": 16,
        "num_kv_heads": 1,
        "head_dim": 64,
        "bits": 8,
        "dtype": torch.float16,
        "device": "cpu",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kvquant.KVCache(**args)  # type: ignore[arg-type]


def test_scratch_buffers_are_reused_and_grow() -> None:
    cache = kvquant.KVCache(1, 4, 16, 2, 64, 8, torch.float32, "cpu")
    a = cache.scratch("k", (2, 3), torch.float32)
    b = cache.scratch("k", (3, 2), torch.float32)
    assert a.data_ptr() == b.data_ptr() and b.shape == (3, 2)  # reused, reshaped
    big = cache.scratch("k", (10, 10), torch.float32)
    assert big.shape == (10, 10) and big.is_contiguous()
    assert cache.scratch("v", (2, 3), torch.float32).data_ptr() != big.data_ptr()
    assert cache.scratch("k", (4,), torch.float16).dtype == torch.float16
