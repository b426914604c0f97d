"""Engine throughput on a GPU with a random-weight Llama-3-8B-shaped model (``dummy:llama-3-8b``,
bfloat16): prefix caching on/off at quant_policy 0, and quant_policy 8/4 with caching on.

Workload: N requests that share a system prompt of S random token ids, each followed by 32
distinct ids, all arriving at t=0 on a cold cache (a fresh engine per configuration, after a
warm-up request that compiles the kernels), greedy, M output tokens each (``ignore_eos``).
Random weights make the text meaningless; the work per token is that of the real model.

Writes ``engine_bench.json`` under ``--out``. ``--quick``: 16 requests, 8 output tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from paged_engine import EngineConfig, LLMEngine, SamplingParams

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("caching on, bits 0", {}),
    ("caching off, bits 0", {"enable_prefix_caching": False}),
    ("caching on, int8", {"quant_policy": 8}),
    ("caching on, int4", {"quant_policy": 4}),
]


def run(name: str, prompts: list[list[int]], max_tokens: int, **cfg: Any) -> dict[str, Any]:
    engine = LLMEngine(EngineConfig(model="dummy:llama-3-8b", device="cuda", dtype="bfloat16",
                                    cache_size_limit=0.5, weight_quant=None, **cfg))
    engine.generate([prompts[0][:40]], SamplingParams(max_tokens=4), use_tqdm=False)  # compile
    engine.reset_prefix_cache()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.monotonic()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params, arrival_time=t0)
    first: dict[str, float] = {}
    out_tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, time.monotonic() - t0)
            if out.finished:
                if out.finish_reason != "length":
                    raise RuntimeError(f"{name}: request {out.request_id} ended: {out.error}")
                out_tokens += len(out.token_ids)
    wall = time.monotonic() - t0
    st = engine.stats()
    res = {
        "config": name,
        "wall_s": wall,
        "output_tok_per_s": out_tokens / wall,
        "total_tok_per_s": (out_tokens + sum(map(len, prompts))) / wall,
        "ttft_mean_s": sum(first.values()) / len(first),
        "hit_rate": st.prefix_cache_hit_rate,
        "kv_blocks": st.num_blocks_total,
        "preemptions": st.num_preemptions,
    }
    print(f"{name:<22} {res['output_tok_per_s']:>9.0f} {res['total_tok_per_s']:>11.0f} "
          f"{res['ttft_mean_s']:>9.3f} {res['hit_rate']:>6.0%} {st.num_blocks_total:>9}")
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 16, 8
    rng = random.Random(0)
    system = [rng.randrange(256) for _ in range(args.system_tokens)]
    prompts = [system + [rng.randrange(256) for _ in range(32)] for _ in range(args.requests)]
    print(f"{torch.cuda.get_device_name(0)}: {args.requests} requests, "
          f"{args.system_tokens}+32 prompt tokens, {args.max_tokens} output tokens")
    print(f"{'config':<22} {'out tok/s':>9} {'total tok/s':>11} {'TTFT s':>9} {'hits':>6} "
          f"{'KV blocks':>9}")
    results = [run(name, prompts, args.max_tokens, **cfg) for name, cfg in CONFIGS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_bench.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(0), "args": vars(args) | {"out": str(args.out)},
         "results": results}, indent=1))


if __name__ == "__main__":
    main()
