"""Decode attention on a GPU: time per call with ``triton.testing.do_bench`` and achieved
memory bandwidth against the device's peak.

Shape: Llama-3-8B's attention (32 query heads, 8 KV heads, head_dim 128, bfloat16, cache
blocks of 16 tokens), one decode token per sequence, batch 1/32/128 at context 1k/8k,
bits 0/8/4. Bytes moved = the K/V codes and scales every sequence reads once, plus q and out.
The peak is measured as a device-to-device copy of 1 GiB (what memory can do in practice);
the nominal datasheet figure is printed next to it when the device is known.

Writes ``decode_bench.json`` under ``--out``. ``--quick``: batch 1 and 32 at 1k only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

import kvquant
from kvquant.triton_kernels import attention_triton

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
NOMINAL_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0}


def copy_peak_gbps() -> float:
    """Read + write bandwidth of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def case(batch: int, context: int, bits: int) -> dict[str, float | int]:
    dev = torch.device("cuda")
    blocks_per_seq = context // BLOCK
    num_blocks = batch * blocks_per_seq
    cache = kvquant.KVCache(1, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, bits, torch.bfloat16, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    # Fill the cache with real codes of random values (write quantizes them).
    kv = torch.randn(num_blocks * BLOCK, KV_HEADS, HEAD_DIM, generator=gen, device=dev)
    slots = torch.arange(num_blocks * BLOCK, device=dev)
    kvquant.write(cache, 0, kv.bfloat16(), kv.bfloat16(), slots)
    del kv
    perm = torch.randperm(num_blocks, generator=gen, device=dev).to(torch.int32)
    tables = perm.view(batch, blocks_per_seq)  # scattered blocks, as after churn
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    query_lens = torch.ones(batch, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=dev).bfloat16()
    args = (q, cache, 0, tables, seq_lens, query_lens, HEAD_DIM**-0.5)
    attention_triton(*args)  # compile outside the timing
    ms = triton.testing.do_bench(lambda: attention_triton(*args), warmup=25, rep=100)
    kv_bytes = cache.bytes_per_token * batch * context  # one layer: K and V, scales included
    moved = kv_bytes + 2 * q.numel() * q.element_size() + tables.numel() * 4
    return {"batch": batch, "context": context, "bits": bits, "ms": ms,
            "gbps": moved / (ms * 1e-3) / 1e9, "bytes": moved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    name = torch.cuda.get_device_name(0)
    peak = copy_peak_gbps()
    nominal = next((v for k, v in NOMINAL_GBPS.items() if k in name), None)
    print(f"{name}: copy peak {peak:.0f} GB/s" + (f", nominal {nominal:.0f} GB/s" if nominal else ""))
    batches, contexts = ([1, 32], [1024]) if args.quick else ([1, 32, 128], [1024, 8192])
    rows = []
    print(f"{'batch':>5} {'context':>7} {'bits':>4} {'us':>9} {'GB/s':>8} {'% peak':>7}")
    for context in contexts:
        for batch in batches:
            for bits in (0, 8, 4):
                r = case(batch, context, bits)
                r["pct_peak"] = 100 * float(r["gbps"]) / peak
                rows.append(r)
                print(f"{batch:>5} {context:>7} {bits:>4} {1000 * float(r['ms']):>9.1f} "
                      f"{float(r['gbps']):>8.0f} {float(r['pct_peak']):>6.0f}%")
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_bench.json").write_text(json.dumps(
        {"device": name, "copy_peak_gbps": peak, "nominal_gbps": nominal, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
