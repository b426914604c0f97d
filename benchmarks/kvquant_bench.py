"""kvquant: KV-cache capacity per bit width, and attention error against float64.

1. Capacity: ``KVCache.bytes_per_token`` for a float16 cache at head_dim 64 and 128, bits 0/8/4,
   and how many more tokens the same memory holds (targets: int8 >= 1.85x, int4 >= 3.4x); also
   for the bundled model's shape (30 layers, 3 KV heads, head_dim 64).
2. Accuracy: realistic K/V (Gaussian, plus a few outlier channels with large magnitude and
   offset, as real keys have) written through ``kvquant.write`` and read by
   ``kvquant.attention`` (torch path) for a prefill chunk after cached context and a decode
   token, compared with float64 attention over the original, unquantized K/V.

Prints tables, saves JSON to benchmarks/results/kvquant_bench.json and a PNG of the errors, and
appends a section to benchmarks/RESULTS.md (unless --no-record).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
from common import HERE, bar_plot, markdown_table, record, save_json

import kvquant

TARGET = {8: 1.85, 4: 3.4}


def capacity() -> list[dict[str, Any]]:
    rows = []
    for name, layers, kv_heads, head_dim in (
        ("1 layer, 1 KV head", 1, 1, 64),
        ("1 layer, 1 KV head", 1, 1, 128),
        ("SmolLM2-135M (30 layers, 3 KV heads)", 30, 3, 64),
    ):
        base = kvquant.KVCache(layers, 1, 16, kv_heads, head_dim, 0, torch.float16, "cpu")
        for bits in (0, 8, 4):
            c = kvquant.KVCache(layers, 1, 16, kv_heads, head_dim, bits, torch.float16, "cpu")
            ratio = base.bytes_per_token / c.bytes_per_token
            rows.append(
                {
                    "shape": name,
                    "head_dim": head_dim,
                    "bits": bits,
                    "bytes_per_token": c.bytes_per_token,
                    "capacity_x": ratio,
                    "target_x": TARGET.get(bits),
                    "meets_target": ratio >= TARGET[bits] if bits in TARGET else None,
                }
            )
    return rows


def realistic(
    n: int, kv_heads: int, d: int, gen: torch.Generator, mult: float, offset: float
) -> torch.Tensor:
    x = torch.randn(n, kv_heads, d, generator=gen, dtype=torch.float64)
    chans = torch.randperm(d, generator=gen)[: max(1, d // 16)]
    x[:, :, chans] = x[:, :, chans] * mult + offset
    return x


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: list[int],
    query_lens: list[int],
    starts: list[int],
    scale: float,
) -> torch.Tensor:
    """Float64 causal attention; ``k``/``v`` hold each sequence's tokens from ``starts[b]``."""
    g = q.shape[1] // k.shape[1]
    out = []
    t = 0
    for s, n, at in zip(seq_lens, query_lens, starts, strict=True):
        kk = k[at : at + s].repeat_interleave(g, 1)
        vv = v[at : at + s].repeat_interleave(g, 1)
        sc = torch.einsum("qhd,khd->hqk", q[t : t + n], kk) * scale
        qpos = torch.arange(s - n, s)
        sc = sc.masked_fill(torch.arange(s)[None, None] > qpos[None, :, None], -math.inf)
        out.append(torch.einsum("hqk,khd->qhd", torch.softmax(sc, -1), vv))
        t += n
    return torch.cat(out)


def accuracy(seed: int) -> list[dict[str, Any]]:
    rows = []
    kv_heads, group, block = 4, 3, 16
    seq_lens, query_lens = [1024, 1024], [128, 1]
    cases = [("outliers", d, dt) for d in (64, 128) for dt in (torch.float16, torch.float32)]
    cases += [("gaussian", d, torch.float16) for d in (64, 128)]
    for dist, head_dim, dtype in cases:
        gen = torch.Generator().manual_seed(seed)
        total = sum(seq_lens)
        outl = dist == "outliers"
        k = realistic(
            total, kv_heads, head_dim, gen, mult=8.0 if outl else 1.0, offset=4.0 if outl else 0.0
        )
        v = realistic(total, kv_heads, head_dim, gen, mult=3.0 if outl else 1.0, offset=0.0)
        q = torch.randn(
            sum(query_lens), kv_heads * group, head_dim, generator=gen, dtype=torch.float64
        )
        starts = [0, seq_lens[0]]
        scale = head_dim**-0.5
        ref = exact_attention(q, k, v, seq_lens, query_lens, starts, scale)
        for bits in (0, 8, 4):
            cache = kvquant.KVCache(
                1, total // block, block, kv_heads, head_dim, bits, dtype, "cpu"
            )
            slots = torch.arange(total, dtype=torch.int64)
            t0 = time.perf_counter()
            kvquant.write(cache, 0, k.to(dtype), v.to(dtype), slots)
            t_write = time.perf_counter() - t0
            tables = torch.arange(total // block, dtype=torch.int32).reshape(2, -1)
            t0 = time.perf_counter()
            out = kvquant.attention(
                q.to(dtype),
                cache,
                0,
                tables,
                torch.tensor(seq_lens, dtype=torch.int32),
                torch.tensor(query_lens, dtype=torch.int32),
                scale,
            )
            t_attn = time.perf_counter() - t0
            err = out.to(torch.float64) - ref
            k_hat = (
                cache.k[0]
                if bits == 0
                else kvquant.dequantize(cache.k[0], cache.k_scale_zero[0], bits)
            )  # type: ignore[arg-type]
            k_err = k_hat.reshape(total, kv_heads, head_dim).to(torch.float64) - k
            rows.append(
                {
                    "k_v": dist,
                    "head_dim": head_dim,
                    "cache_dtype": str(dtype).removeprefix("torch."),
                    "bits": bits,
                    "attn_rel_err": (err.norm() / ref.norm()).item(),
                    "attn_max_abs_err": err.abs().max().item(),
                    "decode_rel_err": (err[-1].norm() / ref[-1].norm()).item(),
                    "k_rel_rms_err": (k_err.norm() / k.norm()).item(),
                    "write_ms": 1e3 * t_write,
                    "attention_ms": 1e3 * t_attn,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(2)

    cap = capacity()
    acc = accuracy(args.seed)
    cap_table = markdown_table(
        ["shape (float16 cache)", "head_dim", "bits", "bytes/token", "capacity", "target"],
        [
            [
                r["shape"],
                r["head_dim"],
                r["bits"],
                r["bytes_per_token"],
                f"{r['capacity_x']:.2f}x",
                ""
                if r["target_x"] is None
                else f">= {r['target_x']}x {'met' if r['meets_target'] else 'MISSED'}",
            ]
            for r in cap
        ],
    )
    acc_table = markdown_table(
        [
            "K/V",
            "head_dim",
            "cache dtype",
            "bits",
            "attn rel err",
            "decode rel err",
            "max abs err",
            "K rel RMS err",
        ],
        [
            [
                r["k_v"],
                r["head_dim"],
                r["cache_dtype"],
                r["bits"],
                f"{r['attn_rel_err']:.2e}",
                f"{r['decode_rel_err']:.2e}",
                f"{r['attn_max_abs_err']:.2e}",
                f"{r['k_rel_rms_err']:.2e}",
            ]
            for r in acc
        ],
    )
    print(cap_table, "\n", acc_table, sep="\n")

    path = save_json("kvquant_bench", {"capacity": cap, "accuracy": acc, "seed": args.seed})
    print(f"\nsaved {path.relative_to(HERE.parent)}")
    fp16 = [r for r in acc if r["cache_dtype"] == "float16" and r["k_v"] == "outliers"]
    png = bar_plot(
        "kvquant_attention_error",
        "kvquant: attention relative error vs float64 (float16 cache, outlier K/V)",
        [f"head_dim {d}" for d in (64, 128)],
        {f"bits {b}": [r["attn_rel_err"] for r in fp16 if r["bits"] == b] for b in (0, 8, 4)},
        "relative error (Frobenius)",
    )
    print(f"saved {png.relative_to(HERE.parent)}")

    if not args.no_record:
        body = (
            "No GPU: CPU only (torch path; the Triton kernels are checked against it under the "
            "interpreter in the package tests, GPU timings are not measured here).\n\n"
            "### Capacity: `KVCache.bytes_per_token` (all layers, K and V, scales included)\n\n"
            f"{cap_table}\n\n"
            "### Attention error vs float64 over the unquantized K/V\n\n"
            "Two sequences of 1024 tokens (a 128-token prefill chunk after 896 cached tokens, "
            "and one decode token), 4 KV heads x GQA 3, block 16, per-token per-head "
            "quantization. `outliers`: K/V standard Gaussian with 1/16 of the channels outliers "
            "(K: x8 + 4, V: x3), as real keys have; `gaussian`: no outliers. Queries Gaussian, "
            "seed "
            f"{args.seed}. `attn rel err` = ||out - ref|| / ||ref|| over every query; "
            "`decode rel err` the decode token alone; bits 0 shows the cache dtype's own "
            "rounding.\n\n"
            f"{acc_table}\n\n"
            f"JSON: `benchmarks/results/kvquant_bench.json`; plot: "
            f"`{png.relative_to(HERE.parent)}`.\n"
        )
        record("kvquant", body)
        print("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
