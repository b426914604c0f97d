"""Shared test setup: the Triton interpreter on CPU, seeds, and float64 references.

``TRITON_INTERPRET=1`` is set here, at import, before anything imports triton, and only when
the variable is unset: on a GPU machine ``TRITON_INTERPRET=0`` runs the same tests compiled.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kvquant


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the full (slow) case matrix unless the marker expression asks for it (-m slow)."""
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="full case matrix: run with -m slow")
    here = Path(__file__).parent
    for item in items:
        if "slow" in item.keywords and here in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    random.seed(0)
    torch.manual_seed(0)
    yield


def device() -> torch.device:
    """CUDA when the tests run compiled on a GPU, else the CPU."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def realistic(
    n: int, kvh: int, d: int, gen: torch.Generator, outliers: bool = True
) -> torch.Tensor:
    """Gaussian K/V with a few large-magnitude outlier channels (as real keys have)."""
    x = torch.randn(n, kvh, d, generator=gen, dtype=torch.float64)
    if outliers:
        chans = torch.randperm(d, generator=gen)[: max(1, d // 16)]
        x[:, :, chans] = x[:, :, chans] * 8.0 + 4.0
    return x


def ref_values(cache: kvquant.KVCache, layer: int, which: str, slots: torch.Tensor) -> torch.Tensor:
    """De-quantized float64 ``[n, kvh, D]`` of the given slots, computed independently."""
    data = (cache.k if which == "k" else cache.v)[layer]
    flat = data.reshape(-1, cache.num_kv_heads, data.shape[-1])[slots.long()]
    if cache.bits == 0:
        return flat.to(torch.float64)
    sz_t = (cache.k_scale_zero if which == "k" else cache.v_scale_zero)[layer]
    assert sz_t is not None
    sz = sz_t.reshape(-1, cache.num_kv_heads, 2)[slots.long()].to(torch.float64)
    codes = flat.to(torch.int64)
    if cache.bits == 4:
        codes = torch.cat([codes % 16, codes // 16], dim=-1)
    return codes.to(torch.float64) * sz[..., :1] + sz[..., 1:]


def ref_attention(
    q: torch.Tensor,
    cache: kvquant.KVCache,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Dense causal float64 attention, one sequence at a time, over the cache's values."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    g = q.shape[1] // cache.num_kv_heads
    start = 0
    for b, (s, n) in enumerate(zip(seq_lens, query_lens, strict=True)):
        if n == 0:
            continue
        pos = torch.arange(s)
        slots = block_tables[b].cpu().long()[pos // cache.block_size] * cache.block_size + (
            pos % cache.block_size
        )
        k = ref_values(cache, layer, "k", slots).repeat_interleave(g, dim=1)  # [s, H, D]
        v = ref_values(cache, layer, "v", slots).repeat_interleave(g, dim=1)
        qq = q[start : start + n].cpu().to(torch.float64)  # [n, H, D]
        scores = torch.einsum("qhd,khd->hqk", qq, k) * scale
        qpos = torch.arange(s - n, s)
        scores = scores.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        out[start : start + n] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)
        start += n
    return out


@dataclass
class Scenario:
    cache: kvquant.KVCache
    layer: int
    k: torch.Tensor  # [T_write, kvh, D] written (padding tokens included)
    v: torch.Tensor
    slot_mapping: torch.Tensor  # int64 [T_write], -1 for padding
    block_tables: torch.Tensor  # int32 [B, W]
    seq_lens: list[int]
    query_lens: list[int]
    q: torch.Tensor  # [sum(query_lens), H, D]
    scale: float

    def lens(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.cache.device
        return (
            torch.tensor(self.seq_lens, dtype=torch.int32, device=dev),
            torch.tensor(self.query_lens, dtype=torch.int32, device=dev),
        )


def poison(cache: kvquant.KVCache) -> None:
    """Fill every slot with garbage a kernel must never read: NaN values or NaN scales."""
    for layer in range(cache.num_layers):
        for data, sz in (
            (cache.k[layer], cache.k_scale_zero[layer]),
            (cache.v[layer], cache.v_scale_zero[layer]),
        ):
            if sz is None:
                data.fill_(float("nan"))
            else:
                data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8))
                sz.fill_(float("nan"))


def build(
    bits: int,
    block_size: int,
    group: int,
    head_dim: int,
    dtype: torch.dtype,
    seq_lens: list[int],
    query_lens: list[int],
    kv_heads: int = 2,
    backend: str = "torch",
    seed: int = 0,
    n_pad: int = 2,
) -> Scenario:
    """Write every token of ``seq_lens`` (shuffled blocks, padding tokens) into a poisoned cache."""
    gen = torch.Generator().manual_seed(seed)
    dev = device()
    need = [cdiv(s, block_size) for s in seq_lens]
    num_blocks = sum(need) + 3
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need) + 1
    tables, slots, ks, vs = [], [], [], []
    for s, nb in zip(seq_lens, need, strict=True):
        mine, ids = ids[:nb], ids[nb:]
        # Padding entries hold a valid id that belongs to nobody in particular.
        tables.append(mine + [num_blocks - 1] * (width - nb))
        pos = torch.arange(s)
        slots.append(
            torch.tensor(mine, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size
        )
        ks.append(realistic(s, kv_heads, head_dim, gen))
        vs.append(realistic(s, kv_heads, head_dim, gen, outliers=False))
    slot_mapping = torch.cat(slots)
    k, v = torch.cat(ks), torch.cat(vs)
    for _ in range(n_pad):  # padding tokens with wild values, to be skipped
        at = int(torch.randint(0, slot_mapping.numel() + 1, (1,), generator=gen))
        slot_mapping = torch.cat([slot_mapping[:at], torch.tensor([-1]), slot_mapping[at:]])
        junk = torch.full((1, kv_heads, head_dim), 1e4, dtype=torch.float64)
        k = torch.cat([k[:at], junk, k[at:]])
        v = torch.cat([v[:at], junk, v[at:]])
    cache = kvquant.KVCache(2, num_blocks, block_size, kv_heads, head_dim, bits, dtype, dev)
    poison(cache)
    layer = 1
    k, v = k.to(dtype).to(dev), v.to(dtype).to(dev)
    slot_mapping = slot_mapping.to(dev)
    kvquant.write(cache, layer, k, v, slot_mapping, backend=backend)  # type: ignore[arg-type]
    t = sum(query_lens)
    q = realistic(t, kv_heads * group, head_dim, gen, outliers=False).to(dtype).to(dev)
    bt = torch.tensor(tables, dtype=torch.int32, device=dev)
    return Scenario(cache, layer, k, v, slot_mapping, bt, seq_lens, query_lens, q, head_dim**-0.5)


@pytest.fixture
def ref() -> SimpleNamespace:
    """Reference helpers (test modules are imported by path, so they share them as a fixture)."""
    helpers: dict[str, Callable[..., object]] = {
        "build": build,
        "attention": ref_attention,
        "values": ref_values,
        "realistic": realistic,
        "device": device,
        "poison": poison,
    }
    return SimpleNamespace(**helpers)
