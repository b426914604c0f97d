"""The prefix cache's disk tier: a restart with a warm store against a cold one.

Workload: a long shared system prompt (default ~2,000 tokens) plus short distinct questions,
greedy. For each quant_policy (0, 8, 4), one engine serves the questions on a cold cache and
shuts down gracefully (its cache goes to the disk tier); a fresh engine on the same directory
(a restart) then serves the same questions. Reports the first request's time to first token
cold and after the restart (target: warm >= 5x faster), whether the greedy outputs are
identical (target: yes for quant_policy 0 and 8), the bytes per token on disk, the time to
copy a block out of the KV cache at eviction (the one cost paid inside a step), and the
steady-state decode throughput with the tier on and off (target: within 5%).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import bar_plot, markdown_table, record, save_json
from engine_throughput import TOPICS, system_prompt

from paged_engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams

QUICK_MODEL = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def ttft(out: RequestOutput) -> float:
    assert out.first_token_time is not None
    return out.first_token_time - out.arrival_time


def serve(engine: LLMEngine, prompts: list[str], max_tokens: int) -> list[RequestOutput]:
    """One request at a time, so the first one's TTFT is its own."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [engine.generate([p], params, use_tqdm=False)[0] for p in prompts]


def restart_run(
    model: str, bits: int, prompts: list[str], max_tokens: int, root: Path, num_blocks: int
) -> dict[str, Any]:
    disk = root / f"bits{bits}"
    cfg = EngineConfig(
        model=model, device="cpu", dtype="float32", quant_policy=bits, num_blocks=num_blocks,
        kv_disk_dir=str(disk),
    )
    first = LLMEngine(cfg)
    cold = serve(first, prompts, max_tokens)
    t0 = time.perf_counter()
    first.close()
    persist_s = time.perf_counter() - t0
    del first
    gc.collect()
    second = LLMEngine(cfg)  # the restart
    warm = serve(second, prompts, max_tokens)
    st = second.stats()
    tokens_on_disk = st.disk_blocks * cfg.block_size
    spill = spill_cost(second)
    second.close()
    same = sum(c.token_ids == w.token_ids for c, w in zip(cold, warm, strict=True))
    return {
        "quant_policy": bits,
        "prompt_tokens": len(cold[0].prompt_token_ids),
        "cold_ttft_s": ttft(cold[0]),
        "warm_ttft_s": ttft(warm[0]),
        "speedup": ttft(cold[0]) / ttft(warm[0]),
        "warm_cached_tokens": warm[0].num_cached_tokens,
        "disk_load_s": st.disk_load_seconds,
        "identical": f"{same}/{len(prompts)}",
        "bytes_per_token": st.disk_bytes / tokens_on_disk if tokens_on_disk else float("nan"),
        "disk_bytes": st.disk_bytes,
        "persist_s": persist_s,
        "spill_copy_us_per_block": spill,
    }


def spill_cost(engine: LLMEngine, n: int = 64, repeats: int = 5) -> float:
    """Microseconds per block to copy blocks out of the KV cache (what eviction pays)."""
    tier = engine.disk_tier
    assert tier is not None
    ids = list(range(min(n, engine.block_pool.num_blocks)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tier._copy_out(ids)
        best = min(best, time.perf_counter() - t0)
    return best / len(ids) * 1e6


def decode_run(model: str, disk: Path | None, n: int, tokens: int, num_blocks: int) -> float:
    """Output tokens/s of ``n`` short requests decoding ``tokens`` tokens each, admitted at once
    (timed from the step after the last prefill)."""
    engine = LLMEngine(
        EngineConfig(
            model=model,
            device="cpu",
            num_blocks=num_blocks,
            kv_disk_dir=None if disk is None else str(disk),
        )
    )
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"d{i}", f"Question {i}: tell me about {TOPICS[i % len(TOPICS)]}.", params)
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    before = engine.stats().generation_tokens_total
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    rate = (engine.stats().generation_tokens_total - before) / (time.perf_counter() - t0)
    engine.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=1024, help="KV blocks of each engine")
    ap.add_argument("--decode-requests", type=int, default=16)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny random model and prompt (smoke run)")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="disk-tier-bench-"))
    try:
        model = args.model
        if args.quick:
            (root / "model.json").write_text(json.dumps(QUICK_MODEL))
            model = f"dummy:{root / 'model.json'}"
            args.system_tokens, args.questions, args.max_tokens = 300, 2, 4
            args.decode_requests, args.decode_tokens, args.decode_repeats = 4, 8, 1
            args.num_blocks = 128
        probe = LLMEngine(EngineConfig(model=model, device="cpu", num_blocks=8))
        system = system_prompt(probe.tokenizer, args.system_tokens)
        del probe
        prompts = [
            f"{system}\nQuestion: explain {TOPICS[i % len(TOPICS)]} briefly.\nAnswer:"
            for i in range(args.questions)
        ]
        runs = []
        for bits in (0, 8, 4):
            r = restart_run(model, bits, prompts, args.max_tokens, root, args.num_blocks)
            print(
                f"  quant_policy {bits}: cold TTFT {r['cold_ttft_s']:.3f}s, warm {r['warm_ttft_s']:.3f}s "
                f"({r['speedup']:.1f}x), identical {r['identical']}, {r['bytes_per_token']:.0f} B/token"
            )
            runs.append(r)
        off, on = [], []
        for i in range(args.decode_repeats):  # interleaved, best of: the machine is shared
            off.append(decode_run(model, None, args.decode_requests, args.decode_tokens, args.num_blocks))
            on.append(
                decode_run(model, root / f"decode{i}", args.decode_requests, args.decode_tokens, args.num_blocks)
            )
        decode = {"off_tok_s": max(off), "on_tok_s": max(on), "ratio": max(on) / max(off)}
        print(f"  decode: tier off {decode['off_tok_s']:.1f} tok/s, on {decode['on_tok_s']:.1f} tok/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    headers = [
        "quant_policy", "prompt tokens", "cold TTFT s", "warm TTFT s (restart)", "speedup",
        "disk load s", "greedy identical", "bytes/token on disk", "spill copy us/block",
    ]  # fmt: skip
    rows = [
        [r["quant_policy"], r["prompt_tokens"], r["cold_ttft_s"], r["warm_ttft_s"], r["speedup"],
         r["disk_load_s"], r["identical"], r["bytes_per_token"], r["spill_copy_us_per_block"]]
        for r in runs
    ]  # fmt: skip
    table = markdown_table(headers, rows)
    worst = min(r["speedup"] for r in runs)
    identical = ", ".join(f"bits {r['quant_policy']}: {r['identical']}" for r in runs)
    summary = (
        f"warm restart vs cold TTFT: {worst:.1f}x at worst (target >= 5x); greedy identical "
        f"{identical} (target: all for "
        f"bits 0 and 8); steady-state decode with the tier on: {decode['on_tok_s']:.1f} tok/s vs "
        f"{decode['off_tok_s']:.1f} off ({decode['ratio']:.3f}x; target >= 0.95)."
    )
    print(table)
    print(summary)
    if args.quick:
        return
    save_json("disk_tier_bench", {"args": vars(args), "runs": runs, "decode": decode, "summary": summary})
    png = bar_plot(
        "disk_tier_bench", "TTFT of the first request: cold vs restart with a warm disk tier",
        [f"quant_policy {r['quant_policy']}" for r in runs],
        {"cold": [r["cold_ttft_s"] for r in runs], "warm restart": [r["warm_ttft_s"] for r in runs]},
        "seconds",
    )
    print(f"saved {png}")
    if not args.no_record:
        record(
            "paged-engine: disk tier, restart with a warm store",
            f"Model `{args.model}`, float32, a ~{args.system_tokens}-token system prompt + "
            f"{args.questions} short questions served one at a time, {args.max_tokens} greedy "
            f"tokens; decode: {args.decode_requests} requests x {args.decode_tokens} tokens, best of "
            f"{args.decode_repeats}.\n\n{table}\n\n{summary}",
        )


if __name__ == "__main__":
    main()
