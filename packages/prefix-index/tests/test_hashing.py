"""The chained hash is a wire format: golden vectors pin it byte for byte."""

from __future__ import annotations

import struct
from array import array

import pytest
import xxhash

from prefix_index import block_hashes, namespace_seed, pack_tokens

# Computed once from DESIGN.md's definition; must never change (routers recompute them).
GOLDEN = [
    (
        list(range(8)),
        4,
        b"",
        "294747410ea7d4767e80401d1415969b",
        ["66b50c69a9f8a92652c04af7d7cea2e7", "d861535a6ee89ea08ef049f15b46e92d"],
    ),
    (
        list(range(8)),
        4,
        b"tenant-a",
        "66b03ec67be0ce93213734dcd9a10753",
        ["0fc704d09396a9804b8b79604ed524a3", "6dcc9fa02b29c4888a57ebcfbcdbc8c5"],
    ),
    (
        [49152, 0, -1, 2**31 - 1, 7],
        2,
        b"",
        "294747410ea7d4767e80401d1415969b",
        ["ba96397e90907f43e2d4dc806f386a6d", "12bc79e07bcaa0982449da96d7c73cb4"],
    ),
]


def reference_chain(tokens: list[int], block_size: int, ns: bytes) -> list[bytes]:
    """DESIGN.md's definition written out with struct, independent of the package."""
    h = xxhash.xxh3_128(b"prefix-index/v1" + struct.pack("<I", len(ns)) + ns).digest()
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        h = xxhash.xxh3_128(h + struct.pack(f"<{block_size}i", *block)).digest()
        out.append(h)
    return out


@pytest.mark.parametrize(("tokens", "bs", "ns", "seed", "chain"), GOLDEN)
def test_golden_vectors(tokens: list[int], bs: int, ns: bytes, seed: str, chain: list[str]) -> None:
    assert namespace_seed(ns).hex() == seed
    assert [h.hex() for h in block_hashes(tokens, bs, ns)] == chain


@pytest.mark.parametrize("bs", [1, 3, 16])
@pytest.mark.parametrize("ns", [b"", b"x", bytes(range(40))])
def test_matches_independent_reference(bs: int, ns: bytes) -> None:
    tokens = [(i * 7919) % 50000 for i in range(101)]
    assert block_hashes(tokens, bs, ns) == reference_chain(tokens, bs, ns)


def test_parent_continues_chain() -> None:
    tokens = list(range(64))
    full = block_hashes(tokens, 16, b"ns")
    head = block_hashes(tokens[:32], 16, b"ns")
    tail = block_hashes(tokens[32:], 16, parent=head[-1])
    assert head + tail == full


def test_partial_block_ignored_and_namespaces_differ() -> None:
    tokens = list(range(35))
    assert len(block_hashes(tokens, 16)) == 2
    assert block_hashes(tokens, 16) == block_hashes(tokens[:32], 16)
    assert block_hashes(tokens, 16, b"a")[0] != block_hashes(tokens, 16, b"b")[0]
    assert block_hashes(list(range(15)), 16) == []


def test_numpy_and_array_inputs_agree() -> None:
    np = pytest.importorskip("numpy")
    tokens = [5, 4, 3, 2, 1, 0, 49151, 12]
    expect = block_hashes(tokens, 4)
    for dtype in (np.int32, np.int64, np.uint16, np.uint32):
        assert block_hashes(np.array(tokens, dtype=dtype), 4) == expect
    assert block_hashes(array("i", tokens), 4) == expect
    assert block_hashes(tuple(tokens), 4) == expect


def test_bad_inputs_raise_actionable_errors() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="int32"):
        pack_tokens([2**31])
    with pytest.raises(ValueError, match="int32"):
        pack_tokens(np.array([2**40], dtype=np.int64))
    with pytest.raises(TypeError, match="integers"):
        pack_tokens(np.array([1.5]))
    with pytest.raises(ValueError, match="one-dimensional"):
        pack_tokens(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="ints"):
        pack_tokens(["a"])
    with pytest.raises(ValueError, match="block_size"):
        block_hashes([1, 2], 0)
    with pytest.raises(TypeError, match="bytes"):
        namespace_seed("tenant")  # type: ignore[arg-type]
