"""The disk tier in the engine: spill on eviction, load at admission, restarts, damage, tenants."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import kvquant
from paged_engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from paged_engine.disk_store import DiskBlockStore
from paged_engine.disk_tier import DiskTier, per_block_tensors
from paged_engine.testing import drain

BS = 4
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
TINY = {
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
PROMPT = list(range(1, 42))  # 41 tokens: 10 reusable blocks of 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("disk-tier-model") / "config.json"
    path.write_text(json.dumps(TINY))
    return f"dummy:{path}"


def _engine(model: str, disk: Path | None, **kw: Any) -> LLMEngine:
    kw.setdefault("num_blocks", 48)
    return LLMEngine(
        EngineConfig(
            model=model,
            device="cpu",
            block_size=BS,
            kv_disk_dir=None if disk is None else str(disk),
            **kw,
        )
    )


def _run(engine: LLMEngine, prompt: list[int], salt: bytes = b"") -> RequestOutput:
    engine.add_request(f"r{time.monotonic_ns()}", prompt, GREEDY, cache_salt=salt)
    (out,) = drain(engine).values()
    return out


@pytest.mark.parametrize("quant_policy", [0, 8, 4])
def test_restart_with_a_warm_store_hits_and_matches(
    model: str, tmp_path: Path, quant_policy: int
) -> None:
    first = _engine(model, tmp_path, quant_policy=quant_policy)
    cold = _run(first, PROMPT)
    warm = _run(first, PROMPT)  # an in-memory hit: the reference for a disk hit
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens == 40
    first.close()  # graceful shutdown persists the in-memory cache

    second = _engine(model, tmp_path, quant_policy=quant_policy)
    assert second.stats().disk_blocks == 11  # 41 + 3 computed tokens: 11 full blocks
    out = _run(second, PROMPT)
    assert out.num_cached_tokens == 40
    assert out.token_ids == cold.token_ids == warm.token_ids
    assert out.logprobs == warm.logprobs  # the same K/V bytes, the same computation
    st = second.stats()
    assert st.disk_hit_tokens == 40 and st.prefix_cache_hit_tokens == 40
    assert st.disk_load_seconds > 0
    # A longer prompt continues past what is stored: the stored part is reused, the rest computed.
    longer = _run(second, [*PROMPT, 7, 7, 7, 7, 7])
    assert longer.num_cached_tokens == 40  # the loaded blocks are in memory; the rest computed
    second.close()


def test_evicted_blocks_spill_and_come_back(model: str, tmp_path: Path) -> None:
    ref = _run(_engine(model, None, num_blocks=14), PROMPT)
    engine = _engine(model, tmp_path, num_blocks=14)
    assert _run(engine, PROMPT).token_ids == ref.token_ids
    # Another long prompt needs the pool: PROMPT's cached blocks are evicted and spilled.
    _run(engine, list(range(100, 141)))
    assert engine.disk_tier is not None
    engine.disk_tier.flush()
    st = engine.stats()
    assert st.num_evictions > 0 and st.disk_spills > 0 and st.disk_spill_drops == 0
    out = _run(engine, PROMPT)
    assert out.num_cached_tokens == 40 and engine.stats().disk_hit_tokens > 0
    assert out.token_ids == ref.token_ids
    assert out.logprobs is not None and ref.logprobs is not None
    got = [v for d in out.logprobs for v in d.values()]
    # The cold run prefilled the prompt in one causal pass, this one only its last token over
    # loaded K/V: the same values through differently shaped kernels.
    assert got == pytest.approx([v for d in ref.logprobs for v in d.values()], abs=1e-4)


def test_a_store_of_another_model_shape_is_ignored(model: str, tmp_path: Path) -> None:
    first = _engine(model, tmp_path)
    _run(first, PROMPT)
    first.close()
    path = Path(model.removeprefix("dummy:")).with_name("other.json")
    path.write_text(json.dumps({**TINY, "num_hidden_layers": 3}))
    other = _engine(f"dummy:{path}", tmp_path)
    assert other.stats().disk_blocks == 0
    assert _run(other, PROMPT).num_cached_tokens == 0
    other.close()
    requant = _engine(model, tmp_path, quant_policy=8)  # same model, other KV format
    assert requant.stats().disk_blocks == 0
    reseeded = _engine(model, tmp_path, seed=1)  # other random weights
    assert reseeded.stats().disk_blocks == 0
    assert _engine(model, tmp_path).stats().disk_blocks == 11  # the original store is intact


def test_damaged_blocks_are_skipped_logged_and_never_served(
    model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _engine(model, tmp_path)
    ref = _run(first, PROMPT)
    first.close()
    files = {p.stem: p for p in tmp_path.rglob("*.kvb")}
    assert len(files) == 11
    hashes = _hashes(PROMPT)
    # Block 6 is corrupted (right length, wrong bytes), block 8 truncated.
    bad = files[hashes[6].hex()]
    data = bytearray(bad.read_bytes())
    data[-40] ^= 0x55
    bad.write_bytes(bytes(data))
    cut = files[hashes[8].hex()]
    cut.write_bytes(cut.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="paged_engine.disk_store"):
        second = _engine(model, tmp_path)
        assert "truncated" in caplog.text
        out = _run(second, PROMPT)
        assert "checksum" in caplog.text
    assert out.num_cached_tokens == 6 * BS  # blocks 0-5 from disk; 6 on were computed
    assert out.token_ids == ref.token_ids
    assert not bad.exists() and not cut.exists()


def _hashes(prompt: list[int], salt: bytes = b"") -> list[bytes]:
    from prefix_index import block_hashes

    return block_hashes(prompt[: (len(prompt) - 1) // BS * BS], BS, salt)


_SPILLER = """
import sys, torch
torch.set_num_threads(1)
from paged_engine import EngineConfig, LLMEngine, SamplingParams
engine = LLMEngine(EngineConfig(model=sys.argv[1], device="cpu", block_size=4, num_blocks=14,
                                kv_disk_dir=sys.argv[2]))
params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
for i in range(2000):  # bounded; the parent kills it long before
    base = 1 + (i % 40) * 6
    engine.generate([list(range(base, base + 41))], params, use_tqdm=False)
"""


def test_kill_9_during_spills_then_restart(model: str, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SPILLER, model, str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.rglob("*.kvb"))) < 30 and time.monotonic() < deadline:
            assert proc.poll() is None, "the spilling process died on its own"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    assert len(list(tmp_path.rglob("*.kvb"))) >= 30
    engine = _engine(model, tmp_path, num_blocks=64)
    assert not list(tmp_path.rglob("*.tmp*"))  # interrupted writes are cleaned up
    assert engine.stats().disk_blocks >= 30
    plain = _engine(model, None, num_blocks=64)
    hits = 0
    for base in (1, 7, 13, 19):
        prompt = list(range(base, base + 41))
        out = _run(engine, prompt)
        hits += out.num_cached_tokens
        assert out.token_ids == _run(plain, prompt).token_ids
    assert hits > 0 and engine.stats().disk_hit_tokens == hits
    engine.close()


def test_size_limit_bounds_the_store(model: str, tmp_path: Path) -> None:
    probe = _engine(model, tmp_path / "probe")
    _run(probe, PROMPT)
    probe.close()
    per_block = sum(p.stat().st_size for p in (tmp_path / "probe").rglob("*.kvb")) // 11
    engine = _engine(model, tmp_path / "limited", kv_disk_size_limit=4 * per_block)
    _run(engine, PROMPT)
    engine.close()
    again = _engine(model, tmp_path / "limited", kv_disk_size_limit=4 * per_block)
    st = again.stats()
    assert st.disk_blocks == 4 and st.disk_bytes <= 4 * per_block
    # Children are written before their parents, so the chain's tail goes first and its head
    # stays usable.
    assert _run(again, PROMPT).num_cached_tokens == 4 * BS


def test_tenants_stay_apart_and_reset_clears_both_tiers(model: str, tmp_path: Path) -> None:
    first = _engine(model, tmp_path)
    _run(first, PROMPT, salt=b"a")
    _run(first, PROMPT, salt=b"b")
    first.close()
    engine = _engine(model, tmp_path)
    assert _run(engine, PROMPT, salt=b"c").num_cached_tokens == 0
    assert engine.reset_prefix_cache(b"a") == 0  # nothing of a's in memory yet, 11 on disk
    assert _run(engine, PROMPT, salt=b"a").num_cached_tokens == 0
    assert _run(engine, PROMPT, salt=b"b").num_cached_tokens == 40
    engine.persist_prefix_cache(b"a")
    assert engine.stats().disk_blocks == 22  # a's (computed again) and b's
    engine.reset_prefix_cache(b"b")
    assert engine.stats().disk_blocks == 11
    engine.reset_prefix_cache()
    assert engine.stats().disk_blocks == 0 and not list(tmp_path.rglob("*.kvb"))
    engine.close()
    with pytest.raises(ValueError, match="kv_disk_dir"):
        _engine(model, None).persist_prefix_cache()


def test_a_full_writer_queue_drops_spills_instead_of_stalling(model: str, tmp_path: Path) -> None:
    engine = _engine(model, None)
    _run(engine, PROMPT)
    store = DiskBlockStore(tmp_path, {"test": 1})
    gate = threading.Event()
    real_put = store.put
    store.put = lambda *a: gate.wait(30) and real_put(*a)  # type: ignore[method-assign]
    tier = DiskTier(store, engine.kv_cache, queue_blocks=3)
    blocks = engine.block_pool.cached_chain()
    assert blocks
    start = time.monotonic()
    queued = tier.spill(blocks)
    assert time.monotonic() - start < 5
    assert queued == 3 and tier.spill_drops == len(blocks) - 3
    gate.set()
    tier.flush()
    assert tier.stats().spills == 3 and len(store) == 3
    tier.close()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(kv_disk_dir="x", enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_disk_size_limit"):
        EngineConfig(kv_disk_size_limit=0)
    with pytest.raises(ValueError, match="kv_disk_dir"):
        EngineConfig(kv_disk_dir="")
    assert EngineConfig(kv_disk_dir=Path("d")).kv_disk_dir == "d"  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("host_path", [True, False])
def test_block_bytes_round_trip(
    tmp_path: Path, bits: int, dtype: torch.dtype, host_path: bool
) -> None:
    """Every per-block tensor (K, V and, quantized, their scales) goes out and back bit for bit,
    through the host copy path and through the batched one accelerators use."""
    cache = kvquant.KVCache(
        num_layers=2,
        num_blocks=8,
        block_size=BS,
        num_kv_heads=2,
        head_dim=8,
        bits=bits,
        dtype=dtype,
    )
    names = {name.split("[")[0] for name, _ in per_block_tensors(cache)}
    assert names == ({"k", "v"} if bits == 0 else {"k", "v", "k_scale_zero", "v_scale_zero"})
    gen = torch.Generator().manual_seed(0)
    for _, t in per_block_tensors(cache):
        if t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
        else:
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    tier = DiskTier(DiskBlockStore(tmp_path, {"t": 1}), cache)
    tier._on_cpu = host_path
    rows = tier._copy_out([0, 2, 3])
    assert all(len(r) == tier.payload_bytes for r in rows)
    tier._copy_in([5, 6, 7], rows)
    for name, t in per_block_tensors(cache):
        assert torch.equal(t[[0, 2, 3]].view(torch.uint8), t[5:8].view(torch.uint8)), name
    tier.close()
