"""The engine's second prefix-cache tier: KV blocks spill to a ``DiskBlockStore`` and come back.

Spill: when the pool evicts cached blocks (and on ``persist``), their K/V bytes are copied out
of the KV cache at once (the pool hands the memory to someone else right after) and queued for
a background writer; when the bounded queue is full the spill is dropped, never waited for.
Load: before a step is scheduled, a waiting request whose prompt continues past the in-memory
cache into the store has those blocks read into freshly allocated pool blocks, checked against
its tokens, and published to the prefix index, so admission then finds them in memory.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kvquant
from prefix_index import CachedBlock

from .block_pool import BlockPool
from .config import EngineConfig
from .disk_store import DiskBlockStore
from .model_loader import ModelSource
from .sequence import Sequence as EngineSequence

__all__ = ["DiskTier", "DiskTierStats", "kv_format", "per_block_tensors"]

logger = logging.getLogger(__name__)

KV_FORMAT_VERSION = "paged-engine-kv/1"


def per_block_tensors(cache: kvquant.KVCache) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of ``cache`` indexed by block (first dimension ``num_blocks``), named
    ``<field>[<layer>]``, in a fixed order: the payload of a block is these tensors' rows.

    Found by inspection rather than listed, so a new per-block tensor of the cache format (a
    new quantization layout) is saved and restored without a change here."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, value in sorted(vars(cache).items()):
        # The block-channel key residual is indexed by residual slot, not block (a slot count
        # may equal num_blocks): it holds open blocks only, never a cached one.
        if name.startswith("_") or name == "k_residual" or not isinstance(value, (list, tuple)):
            continue
        for layer, t in enumerate(value):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == cache.num_blocks:
                out.append((f"{name}[{layer}]", t))
    return out


# EngineConfig fields that change which blocks are cached or when, never a block's K/V values,
# or whose resolved value the format holds anyway (model, device, dtype, seed of random weights).
# Any other field (a future one included) is part of the format, so it keeps stores apart.
_NOT_KV_FIELDS = frozenset(
    {
        "model", "device", "dtype", "seed", "cache_size_limit", "num_blocks", "max_batch_size",
        "max_num_batched_tokens", "max_model_len", "enable_prefix_caching", "eviction_policy",
        "cache_ttl", "prefix_match_threshold", "kv_disk_dir", "kv_disk_size_limit",
    }
)  # fmt: skip


def kv_format(cache: kvquant.KVCache, source: ModelSource, config: EngineConfig) -> dict[str, Any]:
    """What a stored block's bytes mean: the model (spec, shape, and its weights: files and
    sizes, or the seed of random weights), the device kind, the engine settings that can change
    K/V values, and the KV layout (block size, bits, dtype, every per-block tensor's name, row
    shape and dtype). Two engines share stored blocks only when this is equal."""
    if source.weights_dir is None:
        weights: Any = {"random_seed": config.seed}
    else:
        wd = Path(source.weights_dir).resolve()
        weights = {
            "dir": str(wd),
            "files": sorted((p.name, p.stat().st_size) for p in wd.glob("*.safetensors")),
        }
    settings = {
        f.name: str(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name not in _NOT_KV_FIELDS
    }
    return {
        "version": KV_FORMAT_VERSION,
        "model": source.spec,
        "model_config": dataclasses.asdict(source.config),
        "weights": weights,
        "device": torch.device(cache.device).type,
        "engine": settings,
        "block_size": cache.block_size,
        "bits": cache.bits,
        "dtype": str(cache.dtype),
        "layout": str(getattr(cache, "layout", "default")),
        "tensors": [
            (name, list(t.shape[1:]), str(t.dtype)) for name, t in per_block_tensors(cache)
        ],
    }


def _bytes_of(row: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's memory as a flat uint8 numpy array (a view, not a copy)."""
    flat: np.ndarray = row.view(torch.uint8).numpy().reshape(-1)
    return flat


@dataclass(frozen=True)
class DiskTierStats:
    """``hit_tokens``: prompt tokens loaded from disk; ``spills``: blocks written;
    ``spill_drops``: spills dropped because the writer's queue was full; ``load_seconds``:
    time spent loading at admission; ``blocks`` / ``bytes``: what the store holds now."""

    hit_tokens: int
    spills: int
    spill_drops: int
    load_seconds: float
    blocks: int
    bytes: int


@dataclass
class _Spill:
    block: CachedBlock
    payload: memoryview


class DiskTier:
    """Connects a ``DiskBlockStore`` to a KV cache and a block pool (see the module docstring).

    ``queue_blocks`` bounds the blocks waiting for the writer (default: as many as fit in
    ``QUEUE_BYTES``). Call ``close`` to write what is queued and stop the writer (the engine
    does so at shutdown, after ``persist``).
    """

    QUEUE_BYTES = 256 << 20

    def __init__(
        self, store: DiskBlockStore, cache: kvquant.KVCache, queue_blocks: int | None = None
    ) -> None:
        self.store = store
        self.cache = cache
        self.tensors = per_block_tensors(cache)
        self._widths = [t[0].numel() * t.element_size() for _, t in self.tensors]
        self.payload_bytes = sum(self._widths)
        self._on_cpu = torch.device(cache.device).type == "cpu"
        if queue_blocks is None:
            queue_blocks = max(1, self.QUEUE_BYTES // self.payload_bytes)
        self._queue: queue.Queue[_Spill | None] = queue.Queue(maxsize=queue_blocks)
        self.hit_tokens = 0
        self.spills = 0
        self.spill_drops = 0
        self.load_seconds = 0.0
        self._writer = threading.Thread(
            target=self._write_forever, name="kv-disk-writer", daemon=True
        )
        self._writer.start()

    # -- spill ------------------------------------------------------------------------------------

    def spill(self, blocks: Sequence[CachedBlock], wait: bool = False) -> int:
        """Queue ``blocks`` (their KV still in the cache) for writing; returns how many were
        queued. Blocks already stored only become the most recently used there. Without
        ``wait``, blocks that do not fit in the queue are dropped; with it, the caller waits
        for room."""
        todo: list[CachedBlock] = []
        for b in blocks:
            if (b.namespace, b.hash) in self.store:
                self.store.touch(b.namespace, [b.hash])
            else:
                todo.append(b)
        if not wait:
            room = max(0, self._queue.maxsize - self._queue.qsize())
            self.spill_drops += max(0, len(todo) - room)
            todo = todo[:room]
        queued = 0
        for start in range(0, len(todo), self._queue.maxsize):
            chunk = todo[start : start + self._queue.maxsize]
            try:
                rows = self._copy_out([b.handle for b in chunk])
            except Exception:  # best effort: losing a spill must not fail the step
                logger.exception("copying KV blocks out for the disk tier failed")
                self.spill_drops += len(todo) - start
                break
            for b, row in zip(chunk, rows, strict=True):
                try:
                    self._queue.put(_Spill(b, row), block=wait)
                    queued += 1
                except queue.Full:
                    self.spill_drops += 1
        return queued

    def _copy_out(self, block_ids: list[int]) -> list[memoryview]:
        """The payload of each block: its rows of every per-block tensor, as bytes."""
        if self._on_cpu:
            # numpy copies run on this thread; torch's would start a parallel region per
            # tensor, whose spin-waits cost far more than the copy on a busy machine.
            rows = [np.concatenate([_bytes_of(t[b]) for _, t in self.tensors]) for b in block_ids]
            return [memoryview(r.data) for r in rows]
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.cache.device)
        parts = [
            t.index_select(0, ids).reshape(len(block_ids), -1).view(torch.uint8)
            for _, t in self.tensors
        ]
        stacked: np.ndarray = torch.cat(parts, dim=1).cpu().numpy()
        return [memoryview(r.data) for r in stacked]

    def _write_forever(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                b = item.block
                if self.store.put(b.namespace, b.hash, b.parent_hash, b.tokens, item.payload):
                    self.spills += 1
            except (OSError, ValueError) as exc:  # a full or read-only disk: spills are best effort
                logger.warning("writing a KV block to disk failed: %s", exc)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued block is written."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer (idempotent)."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    # -- load -------------------------------------------------------------------------------------

    def load(self, pool: BlockPool, seqs: Iterable[EngineSequence]) -> int:
        """For each of ``seqs`` (waiting requests, best first), load the blocks of its prompt
        that continue the in-memory cache from the store into the pool and publish them; stops
        when the pool has no room left. Returns the tokens loaded."""
        if not pool.caching:
            return 0
        start = time.perf_counter()
        room = pool.num_available()
        loaded = 0
        for seq in seqs:
            if room <= 0:
                break
            if seq.needs_prompt_logits:
                continue
            n = self._load_one(pool, seq, room)
            room -= n
            loaded += n * pool.block_size
        if loaded:
            self.hit_tokens += loaded
            self.load_seconds += time.perf_counter() - start
        return loaded

    def _load_one(self, pool: BlockPool, seq: EngineSequence, room: int) -> int:
        bs = pool.block_size
        hashes = seq.hashes_for((len(seq) - 1) // bs, bs)
        ns = seq.cache_salt
        if not hashes:
            return 0
        prefix = pool.cached_blocks(seq.token_ids, ns, hashes)
        m = len(prefix)
        stored = self.store.match(ns, hashes[m:])
        if stored <= 0:
            return 0
        pool.pin(prefix)  # allocation below must not evict what we extend
        chain = list(prefix)
        try:
            payloads: list[memoryview] = []
            for i in range(m, m + min(stored, room, pool.num_available())):
                block = self.store.get(ns, hashes[i])
                if (
                    block is None
                    or block.tokens != seq.token_ids[i * bs : (i + 1) * bs]
                    or len(block.payload) != self.payload_bytes
                ):
                    break
                payloads.append(block.payload)
            if not payloads:
                return 0
            # Parents last: under the store's size limit a chain then loses its tail first.
            self.store.touch(ns, hashes[m + len(payloads) - 1 : m - 1 if m else None : -1])
            ids = pool.allocate(len(payloads))
            chain += ids
            self._copy_in(ids, payloads)
            chain = pool.publish(chain, seq.token_ids, ns, hashes[: len(chain)])
        finally:
            pool.release(chain)
        return len(payloads)

    def _copy_in(self, block_ids: list[int], payloads: list[memoryview]) -> None:
        if self._on_cpu:
            for b, payload in zip(block_ids, payloads, strict=True):
                src = np.frombuffer(payload, dtype=np.uint8)
                at = 0
                for (_, t), width in zip(self.tensors, self._widths, strict=True):
                    _bytes_of(t[b])[:] = src[at : at + width]
                    at += width
            return
        staged = torch.empty((len(payloads), self.payload_bytes), dtype=torch.uint8)
        for i, p in enumerate(payloads):
            staged[i] = torch.frombuffer(p, dtype=torch.uint8)
        staged = staged.to(self.cache.device)
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.cache.device)
        at = 0
        for (_, t), width in zip(self.tensors, self._widths, strict=True):
            rows = staged[:, at : at + width].contiguous().view(t.dtype)
            t.index_copy_(0, ids, rows.reshape(len(block_ids), *t.shape[1:]))
            at += width

    # -- the rest ---------------------------------------------------------------------------------

    def clear(self, namespace: bytes | None = None) -> int:
        """Delete the stored blocks of one namespace or (None) all, after queued writes land
        (so none comes back); returns how many."""
        self.flush()
        return self.store.clear(namespace)

    def engine_stats(self) -> dict[str, Any]:
        """The ``EngineStats`` fields of this tier."""
        st = self.stats()
        return {
            "disk_hit_tokens": st.hit_tokens,
            "disk_blocks": st.blocks,
            "disk_bytes": st.bytes,
            "disk_spills": st.spills,
            "disk_spill_drops": st.spill_drops,
            "disk_load_seconds": st.load_seconds,
        }

    def stats(self) -> DiskTierStats:
        st = self.store.stats()
        return DiskTierStats(
            hit_tokens=self.hit_tokens,
            spills=self.spills,
            spill_drops=self.spill_drops,
            load_seconds=self.load_seconds,
            blocks=st.blocks,
            bytes=st.bytes,
        )
