"""A persistent store of KV blocks on disk, keyed by (namespace, chained block hash).

Bytes in, bytes out: this module imports nothing but the standard library and xxhash (no
torch, no engine), so any engine or router could use it; the engine side (``disk_tier``) turns
KV tensors into payload bytes and back.

Layout: one file per block, ``<root>/<format digest>/<namespace digest>/<block hash>.kvb``.
The format digest hashes a description of the KV format (model, shapes, dtypes, quantization
layout), so a store written under one format is never read under another; ``format.json``
beside the namespaces says what the digest stands for. A block file is::

    header   magic "KVBLOCK1", flags u32, namespace length u32, token count u32,
             payload length u64, format digest [16], block hash [16], parent hash [16]
    body     namespace bytes, token ids (int32 little-endian), payload
    trailer  xxh3-128 of header and body [16]

A file is written under a temporary name and renamed into place, so a reader never sees a
half-written block under its real name. ``kill -9`` at any moment leaves at most temporary
files (removed at the next start); a file whose length disagrees with its header is skipped at
start and one whose checksum fails is skipped (and deleted) when read: neither is ever served.
No ``fsync``: after a power loss a block may be lost or torn, and then it is detected the same
way. The last-use time of a block is its file's modification time (touched on every hit), so
the LRU order and the TTL survive a restart.

Thread-safe: one engine thread reads while a writer thread writes. One process per directory:
each keeps its own index, and opening a store removes temporary files it finds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

__all__ = ["DiskBlockStore", "DiskStoreStats", "StoredBlock", "format_digest"]

logger = logging.getLogger(__name__)

MAGIC = b"KVBLOCK1"
_HEADER = struct.Struct("<8sIIIQ16s16s16s")
_CHECKSUM_LEN = 16
_HAS_PARENT = 1
_SUFFIX = ".kvb"
_TMP = ".tmp"
HASH_LEN = 16


def format_digest(fmt: Mapping[str, Any]) -> str:
    """Hex digest of a JSON-serializable format description (key order does not matter)."""
    text = json.dumps(fmt, sort_keys=True, separators=(",", ":"), default=str)
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


@dataclass(frozen=True)
class StoredBlock:
    """A block read back: its tokens and payload, checksum verified."""

    namespace: bytes
    hash: bytes
    parent_hash: bytes | None
    tokens: list[int]
    payload: memoryview


@dataclass(frozen=True)
class DiskStoreStats:
    """``blocks`` / ``bytes`` on disk now; counters since this store was opened."""

    blocks: int
    bytes: int
    writes: int
    hits: int
    evictions: int
    expirations: int
    corrupt: int


@dataclass
class _Entry:
    path: Path
    size: int
    last_used: float


class DiskBlockStore:
    """Blocks of one KV format under ``root``; see the module docstring for the layout.

    ``fmt`` describes the format (any JSON-serializable mapping); blocks written under another
    description are in another directory and never read. ``size_limit`` (bytes, None = no
    limit) bounds the files' total size: the least recently used blocks are deleted to make
    room. ``ttl`` (seconds, None = none) drops blocks unused that long (by ``clock``, wall-clock
    seconds, since it must survive restarts). Opening scans the block headers (one small read
    per block) to rebuild the index. Raises ``ValueError`` for bad arguments and ``OSError`` when
    ``root`` cannot be created.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        fmt: Mapping[str, Any],
        size_limit: int | None = None,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if size_limit is not None and (isinstance(size_limit, bool) or size_limit < 1):
            raise ValueError(
                f"size_limit must be a positive number of bytes or None, got {size_limit!r}"
            )
        if ttl is not None and not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        self.digest = format_digest(fmt)
        self._digest_bytes = bytes.fromhex(self.digest)
        self.dir = Path(root) / self.digest
        self.size_limit = size_limit
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        # (namespace, hash) -> entry, least recently used first.
        self._entries: OrderedDict[tuple[bytes, bytes], _Entry] = OrderedDict()
        self._bytes = 0
        self._writes = self._hits = self._evictions = self._expirations = self._corrupt = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "format.json"
        if not info.exists():
            tmp = info.with_name(f"format.json{_TMP}{os.getpid()}")
            tmp.write_text(json.dumps(dict(fmt), sort_keys=True, indent=1, default=str))
            os.replace(tmp, info)
        self._scan()
        self._enforce_limits()

    # -- queries ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether ``(namespace, hash)`` is stored (by the index alone; no I/O)."""
        with self._lock:
            return key in self._entries

    def match(self, namespace: bytes, hashes: Sequence[bytes]) -> int:
        """How many leading ``hashes`` are stored under ``namespace`` (index only, no I/O;
        a block may still fail its checksum when read)."""
        with self._lock:
            self._expire_locked()
            n = 0
            for h in hashes:
                if (namespace, h) not in self._entries:
                    break
                n += 1
            return n

    def stats(self) -> DiskStoreStats:
        with self._lock:
            return DiskStoreStats(
                blocks=len(self._entries),
                bytes=self._bytes,
                writes=self._writes,
                hits=self._hits,
                evictions=self._evictions,
                expirations=self._expirations,
                corrupt=self._corrupt,
            )

    # -- reads and writes -------------------------------------------------------------------------

    def get(self, namespace: bytes, block_hash: bytes) -> StoredBlock | None:
        """The block stored under ``(namespace, block_hash)``, or None when absent, expired or
        damaged (a damaged file is logged, counted in ``corrupt`` and deleted). A hit makes the
        block the most recently used."""
        key = (bytes(namespace), bytes(block_hash))
        with self._lock:
            self._expire_locked()
            entry = self._entries.get(key)
        if entry is None:
            return None
        try:
            with open(entry.path, "rb") as f:
                data = bytearray(os.fstat(f.fileno()).st_size)
                if f.readinto(data) != len(data):
                    data = data[:0]
        except OSError:  # deleted meanwhile (evicted, cleared): a miss
            return None
        block = self._decode(data, entry.path)
        if block is None or (block.namespace, block.hash) != key:
            if block is not None:
                logger.warning("KV block file %s holds another key; skipped", entry.path)
            self._drop_damaged(key, entry)
            return None
        now = self.clock()
        with self._lock:
            if self._entries.get(key) is entry:
                entry.last_used = now
                self._entries.move_to_end(key)
            self._hits += 1
        with contextlib.suppress(OSError):
            os.utime(entry.path, (now, now))
        return block

    def touch(self, namespace: bytes, hashes: Sequence[bytes]) -> None:
        """Make the stored blocks among ``hashes`` the most recently used, the last one most."""
        now = self.clock()
        paths: list[Path] = []
        with self._lock:
            for h in hashes:
                entry = self._entries.get((namespace, h))
                if entry is not None:
                    entry.last_used = now
                    self._entries.move_to_end((namespace, h))
                    paths.append(entry.path)
        for p in paths:
            with contextlib.suppress(OSError):
                os.utime(p, (now, now))

    def put(
        self,
        namespace: bytes,
        block_hash: bytes,
        parent_hash: bytes | None,
        tokens: Sequence[int],
        payload: bytes | bytearray | memoryview,
    ) -> bool:
        """Store a block (unless already stored: then it only becomes the most recently used).
        Returns whether a file was written. ``payload`` is any bytes-like object. A block larger
        than ``size_limit`` is not stored. Raises ``ValueError`` for a hash that is not 16 bytes.
        """
        namespace, block_hash = bytes(namespace), bytes(block_hash)
        payload = memoryview(payload).cast("B")
        if len(block_hash) != HASH_LEN or (
            parent_hash is not None and len(parent_hash) != HASH_LEN
        ):
            raise ValueError(f"block hashes must be {HASH_LEN} bytes (xxh3-128 digests)")
        key = (namespace, block_hash)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = self.clock()
                self._entries.move_to_end(key)
                return False
        data = self._encode(namespace, block_hash, parent_hash, tokens, payload)
        size = sum(len(p) for p in data)
        if self.size_limit is not None and size > self.size_limit:
            return False
        folder = self.dir / _namespace_dir(namespace)
        path = folder / (block_hash.hex() + _SUFFIX)
        tmp = folder / f"{block_hash.hex()}{_TMP}{os.getpid()}.{threading.get_ident()}"
        folder.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            f.writelines(data)
        now = self.clock()
        os.utime(tmp, (now, now))  # the file's time is its last use (read back at start)
        os.replace(tmp, path)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[key] = _Entry(path, size, now)
            self._bytes += size
            self._writes += 1
            victims = self._over_limit_locked()
        _unlink(victims)
        return True

    def clear(self, namespace: bytes | None = None) -> int:
        """Delete every block of one namespace, or (None) all; returns how many."""
        with self._lock:
            keys = [k for k in self._entries if namespace is None or k[0] == namespace]
            paths = [self._entries.pop(k).path for k in keys]
            self._bytes = sum(e.size for e in self._entries.values())
        _unlink(paths)
        for folder in {p.parent for p in paths}:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a concurrent write keeps it
        return len(paths)

    # -- internals --------------------------------------------------------------------------------

    def _encode(
        self,
        namespace: bytes,
        block_hash: bytes,
        parent_hash: bytes | None,
        tokens: Sequence[int],
        payload: memoryview,
    ) -> list[bytes | memoryview]:
        packed = struct.pack(f"<{len(tokens)}i", *tokens)
        header = _HEADER.pack(
            MAGIC,
            _HAS_PARENT if parent_hash is not None else 0,
            len(namespace),
            len(tokens),
            len(payload),
            self._digest_bytes,
            block_hash,
            parent_hash or bytes(HASH_LEN),
        )
        h = xxhash.xxh3_128()
        for part in (header, namespace, packed, payload):
            h.update(part)
        return [header, namespace, packed, payload, h.digest()]

    def _parse_header(
        self, head: bytes | bytearray, file_size: int
    ) -> tuple[int, int, int, bytes] | None:
        """(namespace length, token count, payload length, hash) when ``head`` is a header of
        this format whose lengths add up to ``file_size``; else None."""
        if len(head) < _HEADER.size:
            return None
        magic, _flags, ns_len, n_tok, n_pay, digest, block_hash, _parent = _HEADER.unpack_from(head)
        if magic != MAGIC or digest != self._digest_bytes:
            return None
        if _HEADER.size + ns_len + 4 * n_tok + n_pay + _CHECKSUM_LEN != file_size:
            return None
        return ns_len, n_tok, n_pay, block_hash

    def _decode(self, data: bytearray, path: Path) -> StoredBlock | None:
        parsed = self._parse_header(data, len(data))
        if parsed is None:
            logger.warning("KV block file %s is truncated or not of this format; skipped", path)
            return None
        ns_len, n_tok, _n_pay, block_hash = parsed
        body_end = len(data) - _CHECKSUM_LEN
        view = memoryview(data)
        if xxhash.xxh3_128_digest(view[:body_end]) != data[body_end:]:
            logger.warning("KV block file %s fails its checksum; skipped", path)
            return None
        flags = _HEADER.unpack_from(data)[1]
        parent = (
            bytes(data[_HEADER.size - HASH_LEN : _HEADER.size]) if flags & _HAS_PARENT else None
        )
        at = _HEADER.size
        namespace = bytes(data[at : at + ns_len])
        at += ns_len
        tokens = list(struct.unpack_from(f"<{n_tok}i", data, at))
        at += 4 * n_tok
        return StoredBlock(namespace, block_hash, parent, tokens, view[at:body_end])

    def _drop_damaged(self, key: tuple[bytes, bytes], entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]
                self._bytes -= entry.size
            self._corrupt += 1
        _unlink([entry.path])

    def _scan(self) -> None:
        """Rebuild the index from the block files' headers (namespaces are read from the files,
        not trusted from folder names); remove leftover temporary files."""
        found: list[tuple[float, tuple[bytes, bytes], _Entry]] = []
        for folder in self.dir.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if _TMP in path.name:
                    _unlink([path])  # a write that a crash interrupted
                    continue
                if not path.name.endswith(_SUFFIX):
                    continue
                try:
                    st = path.stat()
                    with open(path, "rb") as f:
                        parsed = self._parse_header(f.read(_HEADER.size), st.st_size)
                        namespace = f.read(parsed[0]) if parsed is not None else b""
                except OSError:
                    continue
                if parsed is None or len(namespace) != parsed[0]:
                    logger.warning("KV block file %s is truncated or damaged; skipped", path)
                    self._corrupt += 1
                    _unlink([path])
                    continue
                key = (namespace, parsed[3])
                found.append((st.st_mtime, key, _Entry(path, st.st_size, st.st_mtime)))
        found.sort(key=lambda t: t[0])
        for _, key, entry in found:
            self._entries[key] = entry
            self._bytes += entry.size

    def _enforce_limits(self) -> None:
        with self._lock:
            self._expire_locked()
            victims = self._over_limit_locked()
        _unlink(victims)

    def _over_limit_locked(self) -> list[Path]:
        """Drop least recently used entries until the size limit holds; returns their files."""
        out: list[Path] = []
        if self.size_limit is None:
            return out
        while self._bytes > self.size_limit and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size
            self._evictions += 1
            out.append(entry.path)
        return out

    def _expire_locked(self) -> None:
        if self.ttl is None or not self._entries:
            return
        deadline = self.clock() - self.ttl
        victims: list[Path] = []
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.last_used > deadline:
                break
            del self._entries[key]
            self._bytes -= entry.size
            self._expirations += 1
            victims.append(entry.path)
        _unlink(victims)


def _namespace_dir(namespace: bytes) -> str:
    # Fixed length and filesystem-safe whatever the namespace bytes are.
    return "ns-" + xxhash.xxh3_128_hexdigest(namespace)


def _unlink(paths: Sequence[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()
