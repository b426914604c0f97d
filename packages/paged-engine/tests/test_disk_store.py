"""DiskBlockStore on its own: bytes in and out, format isolation, damage, limits, TTL."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from paged_engine.disk_store import DiskBlockStore
from prefix_index import block_hashes

FMT = {"model": "tiny", "bits": 0}
B = 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def chain(n: int, ns: bytes = b"") -> tuple[list[int], list[bytes]]:
    tokens = list(range(10, 10 + n * B))
    return tokens, block_hashes(tokens, B, ns)


def fill(store: DiskBlockStore, n: int, ns: bytes = b"", size: int = 100) -> list[bytes]:
    tokens, hashes = chain(n, ns)
    for i, h in enumerate(hashes):
        parent = hashes[i - 1] if i else None
        assert store.put(ns, h, parent, tokens[i * B : (i + 1) * B], bytes([i]) * size)
    return hashes


def files(store: DiskBlockStore) -> list[Path]:
    return sorted(store.dir.rglob("*.kvb"))


def test_round_trip_match_and_reopen(tmp_path: Path) -> None:
    store = DiskBlockStore(tmp_path, FMT)
    hashes = fill(store, 3)
    tokens, _ = chain(3)
    assert store.match(b"", hashes) == 3 and store.match(b"", hashes[1:]) == 2
    got = store.get(b"", hashes[1])
    assert got is not None
    assert got.tokens == tokens[B : 2 * B] and bytes(got.payload) == bytes([1]) * 100
    assert got.parent_hash == hashes[0] and got.hash == hashes[1]
    first = store.get(b"", hashes[0])
    assert first is not None and first.parent_hash is None
    assert not store.put(b"", hashes[0], None, tokens[:B], b"x")  # already stored
    again = DiskBlockStore(tmp_path, FMT)
    assert len(again) == 3 and again.match(b"", hashes) == 3
    assert again.stats().bytes == sum(p.stat().st_size for p in files(again))
    got = again.get(b"", hashes[2])
    assert got is not None and bytes(got.payload) == bytes([2]) * 100


def test_namespaces_and_formats_are_apart(tmp_path: Path) -> None:
    store = DiskBlockStore(tmp_path, FMT)
    long_ns = bytes(range(256)) * 40  # any bytes, any length
    hl = fill(store, 2, long_ns)
    assert DiskBlockStore(tmp_path, FMT).match(long_ns, hl) == 2
    assert store.clear(long_ns) == 2
    ha = fill(store, 2, b"tenant-a")
    hb = fill(store, 2, b"tenant-b")
    assert store.match(b"tenant-b", ha) == 0 and store.get(b"tenant-b", ha[0]) is None
    assert store.match(b"tenant-a", ha) == 2 and store.match(b"tenant-b", hb) == 2
    other = DiskBlockStore(tmp_path, {**FMT, "bits": 8})
    assert len(other) == 0 and other.dir != store.dir
    assert other.match(b"tenant-a", ha) == 0
    assert store.clear(b"tenant-a") == 2
    assert store.match(b"tenant-a", ha) == 0 and store.match(b"tenant-b", hb) == 2
    assert len(DiskBlockStore(tmp_path, FMT)) == 2
    assert store.clear() == 2 and files(store) == []


def test_truncated_and_corrupted_blocks_are_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DiskBlockStore(tmp_path, FMT)
    hashes = fill(store, 3)
    by_name = {p.name: p for p in files(store)}
    truncated = by_name[hashes[0].hex() + ".kvb"]
    truncated.write_bytes(truncated.read_bytes()[:-7])
    corrupted = by_name[hashes[1].hex() + ".kvb"]
    data = bytearray(corrupted.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    (truncated.parent / "leftover.kvb.tmp123.1").write_bytes(b"half a block")
    with caplog.at_level(logging.WARNING, logger="paged_engine.disk_store"):
        reopened = DiskBlockStore(tmp_path, FMT)
        assert "truncated" in caplog.text
        assert reopened.match(b"", hashes[1:]) == 2  # the length is right: found by the scan
        assert reopened.get(b"", hashes[1]) is None  # ... but never served
        assert "checksum" in caplog.text
    assert reopened.match(b"", hashes) == 0 and reopened.match(b"", hashes[2:]) == 1
    assert reopened.stats().corrupt == 2
    assert [p.name for p in files(reopened)] == [hashes[2].hex() + ".kvb"]
    assert not list(reopened.dir.rglob("*.tmp*"))


def test_size_limit_evicts_least_recently_used_and_survives_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    probe = DiskBlockStore(tmp_path / "probe", FMT, clock=clock)
    fill(probe, 1)
    one = probe.stats().bytes
    store = DiskBlockStore(tmp_path, FMT, size_limit=3 * one, clock=clock)
    tokens, hashes = chain(5)
    for i in range(3):
        clock.now += 1
        store.put(b"", hashes[i], None, tokens[i * B : (i + 1) * B], b"p" * 100)
    clock.now += 1
    assert store.get(b"", hashes[0]) is not None  # block 0 is now the most recently used
    clock.now += 1
    store.put(b"", hashes[3], None, tokens[3 * B : 4 * B], b"p" * 100)
    assert [(b"", h) in store for h in hashes[:4]] == [True, False, True, True]
    st = store.stats()
    assert st.bytes <= 3 * one and st.evictions == 1 and len(files(store)) == 3
    # The LRU order comes back from the files' times: block 2 is now the oldest.
    reopened = DiskBlockStore(tmp_path, FMT, size_limit=2 * one, clock=clock)
    assert [(b"", h) in reopened for h in hashes[:4]] == [True, False, False, True]
    assert not DiskBlockStore(tmp_path / "tiny", FMT, size_limit=one - 1).put(
        b"", hashes[4], None, tokens[16:20], b"p" * 100
    )


def test_ttl_drops_blocks_unused_that_long(tmp_path: Path) -> None:
    clock = FakeClock()
    store = DiskBlockStore(tmp_path, FMT, ttl=10.0, clock=clock)
    hashes = fill(store, 2)
    clock.now += 6
    assert store.get(b"", hashes[0]) is not None
    clock.now += 6  # block 1 idle 12 s, block 0 idle 6 s
    assert store.match(b"", hashes) == 1 and (b"", hashes[1]) not in store
    assert store.stats().expirations == 1
    clock.now += 20
    assert len(DiskBlockStore(tmp_path, FMT, ttl=10.0, clock=clock)) == 0


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size_limit"):
        DiskBlockStore(tmp_path, FMT, size_limit=0)
    with pytest.raises(ValueError, match="ttl"):
        DiskBlockStore(tmp_path, FMT, ttl=-1)
    store = DiskBlockStore(tmp_path, FMT)
    with pytest.raises(ValueError, match="16 bytes"):
        store.put(b"", b"short", None, [1, 2], b"x")
    assert os.path.exists(store.dir / "format.json")
