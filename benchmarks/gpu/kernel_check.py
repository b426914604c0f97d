"""Compiled Triton kernels on a GPU: results against the torch path, then the registers and
spills the driver reports for every kernel compiled along the way.

Cases: dtype float16/bfloat16 x bits 0/8/4 x head_dim 64/128/256 x GQA group 1/4/8 x cache
block 16/64, each with a batch that mixes prefill chunks and decode tokens, run with and
without KV splits, compared with ``backend="torch"`` (the CPU reference path, here on the GPU).
It needs no pytest: the device may not have it (``run.sh`` runs the pytest matrix too when
pytest is there).

Cases run in ``--jobs`` processes (one GPU, several host processes), so the kernels compile in
parallel; Triton's disk cache then serves later steps. Writes ``kernel_check.json`` (failures
and per-kernel resource usage) under ``--out`` and exits 1 on any mismatch. ``--quick``:
head_dim 128 only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import sys
import traceback
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "0"

import torch

import kvquant
from kvquant import triton_kernels as tk

ATOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
SEQ_LENS = [300, 70, 1025, 1, 20]
QUERY_LENS = [300, 13, 1, 1, 0]


def check(dtype: torch.dtype, bits: int, d: int, group: int, block: int) -> list[str]:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    kvh = 2
    need = [-(-s // block) for s in SEQ_LENS]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, device=dev, generator=gen)
    tables, slots, start = [], [], 0
    width = max(need)
    for s, nb in zip(SEQ_LENS, need, strict=True):
        mine = perm[start : start + nb]
        start += nb
        tables.append(torch.cat([mine, mine[:1].repeat(width - nb)]))
        pos = torch.arange(s, device=dev)
        slots.append(mine[pos // block] * block + pos % block)
    slot_mapping = torch.cat(slots)
    n = slot_mapping.numel()
    k = (torch.randn(n, kvh, d, device=dev, generator=gen) * 2).to(dtype)
    v = torch.randn(n, kvh, d, device=dev, generator=gen).to(dtype)
    caches = [kvquant.KVCache(1, num_blocks, block, kvh, d, bits, dtype, dev) for _ in range(2)]
    kvquant.write(caches[0], 0, k, v, slot_mapping, backend="torch")
    kvquant.write(caches[1], 0, k, v, slot_mapping, backend="triton")
    bad = []
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
        if bits:
            diff = (a.to(torch.int16) - b.to(torch.int16)).abs()
            if bits == 4:
                diff = torch.cat([(a & 0xF).to(torch.int16) - (b & 0xF), (a >> 4).to(torch.int16)
                                  - (b >> 4)], -1).abs()
            if int(diff.max()) > 1:
                bad.append("write: codes differ by more than one step")
        elif not torch.equal(a, b):
            bad.append("write: stored values differ")
    q = torch.randn(sum(QUERY_LENS), kvh * group, d, device=dev, generator=gen).to(dtype)
    bt = torch.stack(tables).to(torch.int32)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=dev)
    query_lens = torch.tensor(QUERY_LENS, dtype=torch.int32, device=dev)
    args = (caches[0], 0, bt, seq_lens, query_lens, d**-0.5)
    expect = kvquant.attention(q, *args, backend="torch").float()
    decode_q = q[-3:-1]  # the two decode tokens alone: the small-tile variant
    decode_args = (caches[0], 0, bt[2:4], seq_lens[2:4], query_lens[2:4], d**-0.5)
    decode_expect = kvquant.attention(decode_q, *decode_args, backend="torch").float()
    for splits in (1, 3):
        for name, qq, aa, ref in (("mixed", q, args, expect),
                                  ("decode", decode_q, decode_args, decode_expect)):
            got = tk.attention_triton(qq, *aa, num_splits=splits).float()
            err = float((got - ref).abs().max())
            if not err <= ATOL[dtype]:
                bad.append(f"attention {name} splits={splits}: max error {err:.3g}")
    return bad


def compiled_kernels() -> list[dict[str, Any]]:
    """Registers, spills and shared memory of every kernel compiled in this process."""
    rows = []
    for name in ("_write_kernel", "_dequantize_kernel", "_attention_kernel", "_combine_kernel"):
        fn = getattr(tk, name)
        for caches in getattr(fn, "device_caches", {}).values():
            for compiled in caches[0].values():
                try:
                    compiled._init_handles()
                    consts = {fn.arg_names[k[0]]: str(v) for k, v in compiled.src.constants.items()}
                    rows.append({"kernel": name, "constexprs": consts,
                                 "registers": compiled.n_regs, "spills": compiled.n_spills,
                                 "shared_bytes": compiled.metadata.shared,
                                 "num_warps": compiled.metadata.num_warps})
                except Exception as e:  # best effort: Triton's internals move between versions
                    rows.append({"kernel": name, "error": f"{type(e).__name__}: {e}"})
    return rows


Case = tuple[torch.dtype, int, int, int, int]


def run_cases(cases: list[Case]) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """Check ``cases`` (in a worker process); failures by case, and the kernels compiled."""
    failures: dict[str, list[str]] = {}
    for dtype, bits, d, group, block in cases:
        label = f"{str(dtype)[6:]} bits={bits} D={d} g={group} bs={block}"
        try:
            bad = check(dtype, bits, d, group, block)
        except Exception:
            bad = [traceback.format_exc(limit=3)]
        print(f"{'FAIL' if bad else 'ok  '} {label}" + "".join(f"\n     {b}" for b in bad),
              flush=True)
        if bad:
            failures[label] = bad
    return failures, compiled_kernels()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    args = ap.parse_args()
    dims = [128] if args.quick else [64, 128, 256]
    cases = list(itertools.product([torch.float16, torch.bfloat16], [0, 8, 4], dims, [1, 4, 8],
                                   [16, 64]))
    # Cases sharing (dtype, bits, head_dim) share kernels: keep them in one process.
    groups: dict[tuple[Any, ...], list[Case]] = {}
    for c in cases:
        groups.setdefault(c[:3], []).append(c)
    chunks: list[list[Case]] = [[] for _ in range(max(1, args.jobs))]
    for i, group_cases in enumerate(groups.values()):
        chunks[i % len(chunks)] += group_cases
    failures: dict[str, list[str]] = {}
    kernels: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(len(chunks), mp_context=ctx) as pool:
        for fails, compiled in pool.map(run_cases, [c for c in chunks if c]):
            failures.update(fails)
            kernels += compiled
    spilled = [k for k in kernels if k.get("spills")]
    print(f"{len(cases) - len(failures)}/{len(cases)} cases match; {len(kernels)} kernels "
          f"compiled, {len(spilled)} spill, max {max((k.get('registers', 0) for k in kernels), default=0)} registers")
    for k in spilled:
        print(f"  spills: {k}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_check.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "failures": failures, "kernels": kernels},
        indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
