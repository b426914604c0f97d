"""prefix-index throughput against two baselines, in the same process on the same prompts.

Workload: block size 16, ~1M tokens of prompts that share a few long prefixes (system prompts /
few-shot examples) followed by unique suffixes. Measures tokens/s for:
- hashing: `block_hashes` (chained xxh3-128) vs a chained SHA-256 over pickle (vLLM's default
  block-hash scheme: sha256(pickle((parent, tokens, extra))));
- match + insert per request: `PrefixIndex` vs a pure-Python trie with one dict node per token
  (a radix cache at page size 1).
Targets: hashing >= 2x the SHA-256 chain; match+insert >= 1.5x the per-token trie.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import random
import time
from collections.abc import Callable
from typing import Any

from common import bar_plot, markdown_table, record, save_json

from prefix_index import PrefixIndex, block_hashes


def make_prompts(num_prefixes: int, prefix_len: int, suffix_len: int, total: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50_000) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    prompts: list[list[int]] = []
    count = 0
    while count < total:
        p = prefixes[rng.randrange(num_prefixes)] + [rng.randrange(50_000) for _ in range(suffix_len)]
        prompts.append(p)
        count += len(p)
    return prompts


def sha256_pickle_chain(tokens: list[int], block_size: int) -> list[bytes]:
    out: list[bytes] = []
    parent: bytes | None = None
    for i in range(len(tokens) // block_size):
        block = tuple(tokens[i * block_size : (i + 1) * block_size])
        parent = hashlib.sha256(pickle.dumps((parent, block, None), protocol=pickle.HIGHEST_PROTOCOL)).digest()
        out.append(parent)
    return out


class TokenTrie:
    """One dict node per token; values are slot ids (a page-size-1 radix cache)."""

    def __init__(self) -> None:
        self.root: dict[int, Any] = {}
        self.next_slot = 0

    def match(self, tokens: list[int]) -> int:
        node, n = self.root, 0
        for t in tokens:
            child = node.get(t)
            if child is None:
                break
            node, n = child[1], n + 1
        return n

    def insert(self, tokens: list[int]) -> None:
        node = self.root
        for t in tokens:
            child = node.get(t)
            if child is None:
                child = node[t] = (self.next_slot, {})
                self.next_slot += 1
            node = child[1]


def best_of(repeats: int, fn: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000, help="total prompt tokens (default 1M)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefixes", type=int, default=8, help="number of shared prefixes")
    ap.add_argument("--prefix-len", type=int, default=1024)
    ap.add_argument("--suffix-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="best of N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()

    prompts = make_prompts(args.prefixes, args.prefix_len, args.suffix_len, args.tokens, args.seed)
    total = sum(len(p) for p in prompts)
    bs = args.block_size
    print(f"{len(prompts)} prompts, {total:,} tokens, block size {bs}")

    def hash_xxh() -> None:
        for p in prompts:
            block_hashes(p, bs)

    def hash_sha() -> None:
        for p in prompts:
            sha256_pickle_chain(p, bs)

    def index_run() -> None:
        index = PrefixIndex(bs)
        next_id = 0
        for p in prompts:
            m = index.match(p)
            n = len(p) // bs
            handles = m.handles + list(range(next_id, next_id + n - len(m.handles)))
            next_id += n - len(m.handles)
            index.insert(p, handles, hashes=m.hashes)

    def trie_run() -> None:
        trie = TokenTrie()
        for p in prompts:
            trie.match(p)
            trie.insert(p)

    t_xxh, t_sha = best_of(args.repeats, hash_xxh), best_of(args.repeats, hash_sha)
    t_idx, t_trie = best_of(args.repeats, index_run), best_of(args.repeats, trie_run)
    rows = [
        ["hashing", "block_hashes (xxh3-128 chain)", total / t_xxh, "SHA-256 over pickle chain", total / t_sha, t_sha / t_xxh, 2.0],
        ["match + insert", "PrefixIndex", total / t_idx, "per-token dict trie", total / t_trie, t_trie / t_idx, 1.5],
    ]
    headers = ["operation", "prefix-index", "tokens/s", "baseline", "tokens/s", "speedup", "target"]
    table = markdown_table(headers, rows)
    print(table)
    save_json("prefix_index_bench", {"args": vars(args), "tokens": total, "rows": [dict(zip(headers, r, strict=True)) for r in rows]})
    png = bar_plot(
        "prefix_index_bench",
        f"prefix-index vs baselines ({total:,} tokens, block size {bs})",
        ["hashing", "match + insert"],
        {"prefix-index": [rows[0][2], rows[1][2]], "baseline": [rows[0][4], rows[1][4]]},
        "tokens / s",
    )
    print(f"saved {png}")
    if not args.no_record:
        record(
            "prefix-index: hashing and match+insert throughput",
            f"{len(prompts)} prompts, {total:,} tokens, {args.prefixes} shared prefixes of "
            f"{args.prefix_len} tokens + {args.suffix_len}-token unique suffixes, block size {bs}, "
            f"best of {args.repeats}.\n\n{table}\n\nTargets: hashing >= 2x, match+insert >= 1.5x "
            f"(met: {'yes' if rows[0][5] >= 2 and rows[1][5] >= 1.5 else 'NO'}).",
        )


if __name__ == "__main__":
    main()
