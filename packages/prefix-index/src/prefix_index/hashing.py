"""Chained block hashes: the byte-exact scheme every engine and router must agree on.

``seed = H(b"prefix-index/v1" + len(ns) as 4-byte little-endian + ns)``,
``h_0 = H(seed + block_0)``, ``h_i = H(h_{i-1} + block_i)``, where ``H`` is xxh3-128 (its
16-byte canonical digest) and a block is its ``block_size`` token ids packed as little-endian
int32. Only full blocks are hashed; a trailing partial block is ignored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import xxhash

Hasher = Callable[[bytes], bytes]
"""Maps bytes to a fixed-length digest. The default is xxh3-128's 16-byte digest."""

Tokens: TypeAlias = "Sequence[int] | Any"
"""A sequence of token ids, or a one-dimensional integer numpy array (duck-typed)."""

_DOMAIN = b"prefix-index/v1"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def default_hasher(data: bytes) -> bytes:
    """xxh3-128 of ``data`` as the 16 bytes of ``digest()`` (canonical, big-endian)."""
    return xxhash.xxh3_128_digest(data)


def namespace_seed(namespace: bytes = b"", hasher: Hasher | None = None) -> bytes:
    """The chain's starting digest for ``namespace`` (a tenant salt; ``b""`` is the shared one)."""
    if not isinstance(namespace, (bytes, bytearray)):
        raise TypeError(
            f"namespace must be bytes, got {type(namespace).__name__}; encode strings first"
        )
    ns = bytes(namespace)
    return (hasher or default_hasher)(_DOMAIN + len(ns).to_bytes(4, "little") + ns)


def pack_tokens(tokens: Tokens) -> bytes:
    """Token ids as little-endian int32 bytes (4 bytes per token).

    Accepts a sequence of ints or an integer numpy array without importing numpy.
    Raises ``ValueError`` for ids outside int32 and ``TypeError`` for non-integer input.
    """
    arr: Any = tokens
    dtype = getattr(arr, "dtype", None)
    if dtype is not None and hasattr(arr, "astype"):
        if getattr(arr, "ndim", 1) != 1:
            raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
        if dtype.kind not in "iu":
            raise TypeError(f"tokens must hold integers, got an array of dtype {dtype}")
        if (
            dtype.itemsize >= 4
            and len(arr)
            and (int(arr.min()) < _INT32_MIN or int(arr.max()) > _INT32_MAX)
        ):
            raise ValueError("token ids must fit in int32")
        return bytes(arr.astype("<i4").tobytes())
    try:
        return struct.pack(f"<{len(arr)}i", *arr)
    except struct.error as exc:
        if "not an integer" in str(exc):
            raise TypeError(f"tokens must be a sequence of ints: {exc}") from None
        raise ValueError(f"token ids must fit in int32: {exc}") from None
    except TypeError as exc:
        raise TypeError(f"tokens must be a sequence of ints: {exc}") from None


def chain_hashes(
    packed: bytes,
    block_size: int,
    start: int,
    stop: int,
    parent: bytes,
    hasher: Hasher,
) -> list[bytes]:
    """Hashes of full blocks ``start..stop-1`` of ``packed``, continuing from ``parent``."""
    step = 4 * block_size
    out: list[bytes] = []
    h = parent
    for i in range(start, stop):
        h = hasher(h + packed[i * step : (i + 1) * step])
        out.append(h)
    return out


def block_hashes(
    tokens: Tokens,
    block_size: int,
    namespace: bytes = b"",
    parent: bytes | None = None,
    hasher: Hasher | None = None,
) -> list[bytes]:
    """The chained hash of every full block of ``tokens``.

    ``parent`` continues a chain: pass the digest of the block just before ``tokens[0]`` (then
    ``namespace`` is already folded into it and is ignored). Cost: O(len(tokens)).
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    hasher = hasher or default_hasher
    packed = pack_tokens(tokens)
    start = parent if parent is not None else namespace_seed(namespace, hasher)
    return chain_hashes(packed, block_size, 0, len(packed) // (4 * block_size), start, hasher)
