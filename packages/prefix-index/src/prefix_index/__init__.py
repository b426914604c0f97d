"""prefix_index: a radix index of KV-cache blocks keyed by chained xxhash block hashes.

Pure Python plus xxhash, so any engine or router can reuse it.
"""

from .events import BlockRemoved, BlockStored, Cleared, EventSubscriber, IndexEvent, PrefixTracker
from .hashing import Hasher, block_hashes, default_hasher, namespace_seed, pack_tokens
from .index import CachedBlock, Match, PrefixIndex
from .policy import BlockAccess, EvictionPolicy, HybridPolicy, LFUPolicy, LRUPolicy, make_policy
from .stats import IndexStats

__version__ = "0.1.0"

__all__ = [
    "BlockAccess",
    "BlockRemoved",
    "BlockStored",
    "CachedBlock",
    "Cleared",
    "EventSubscriber",
    "EvictionPolicy",
    "Hasher",
    "HybridPolicy",
    "IndexEvent",
    "IndexStats",
    "LFUPolicy",
    "LRUPolicy",
    "Match",
    "PrefixIndex",
    "PrefixTracker",
    "block_hashes",
    "default_hasher",
    "make_policy",
    "namespace_seed",
    "pack_tokens",
]
