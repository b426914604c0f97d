"""What bfloat16 compute and weight-only quantization cost in accuracy: the quality guard of
the CPU defaults.

Engines with different ``dtype`` / ``weight_quant`` settings score the same offline text as
``kv_quant_accuracy.py`` (its text, scoring and greedy comparison are reused) with teacher
forcing through the paged path, against the exact path (``dtype="float32"``,
``weight_quant=None``): perplexity change, mean KL, top-1 agreement, and greedy agreement of
chat continuations. Prefill chunks default to 64 tokens, below ``weight_quant.DENSE_ROWS``, so
the scores go through the same weight-only kernels as decoding. Guard: the default
configuration within 1% perplexity of the exact path with top-1 agreement >= 0.97.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import markdown_table, record, save_json
from kv_quant_accuracy import GEN_PROMPTS, MODULES, generate_all, pydoc_text, score_all

from paged_engine import EngineConfig, LLMEngine

EXACT = "float32/none"
CONFIGS = (EXACT, "bfloat16/none", "bfloat16/int8", "bfloat16/int4", "auto/auto")


def make_engine(cfg: str, chunk: int, num_blocks: int) -> LLMEngine:
    dtype, wq = cfg.split("/")
    return LLMEngine(
        EngineConfig(
            model="default",
            device="cpu",
            dtype=dtype,
            weight_quant=None if wq == "none" else wq,
            num_blocks=num_blocks,
            max_num_batched_tokens=chunk,
            enable_prefix_caching=False,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help="dtype/weight_quant")
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--segment", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = [EXACT, *(c for c in args.configs if c != EXACT)]
    t0 = time.perf_counter()
    num_blocks = (args.segment + args.gen_tokens) * len(GEN_PROMPTS) // 16 + 64
    engines = {c: make_engine(c, args.chunk, num_blocks) for c in configs}
    resolved = {
        c: f"{str(e.dtype).removeprefix('torch.')}/{e.weight_quant}" for c, e in engines.items()
    }
    ids = engines[EXACT].tokenizer.encode(pydoc_text())[: args.tokens]
    segments = [ids[i : i + args.segment] for i in range(0, len(ids), args.segment)]
    scores = score_all(engines, segments)
    gens = generate_all(engines, args.gen_tokens)
    rows = [
        [
            f"{c} ({resolved[c]})",
            scores[c]["perplexity"],
            scores[c]["perplexity_change_pct"],
            scores[c]["mean_kl"],
            scores[c]["top1_agreement"],
            f"{int(gens[c]['greedy_exact_match'] * len(GEN_PROMPTS))}/{len(GEN_PROMPTS)}",
            f"{gens[c]['greedy_mean_common_prefix']:.1f}/{args.gen_tokens}",
        ]
        for c in configs
    ]
    table = markdown_table(
        ["dtype/weight_quant (resolved)", "perplexity", "change %", "mean KL", "top-1 agree", "greedy exact", "greedy common prefix"],
        rows,
    )
    elapsed = time.perf_counter() - t0
    print(table)
    save_json("weight_quant_accuracy", {"scores": scores, "greedy": gens, "resolved": resolved, "args": vars(args)})
    if not args.no_record:
        record(
            "Weights and compute dtype: accuracy against the exact path",
            f"Text and method of `kv_quant_accuracy.py` (pydoc of {', '.join(MODULES)}): the "
            f"first {len(ids):,} tokens as {len(segments)} sequences of {args.segment}, prefilled "
            f"in chunks of {args.chunk} tokens (the weight-only kernels' path) through "
            f"`LLMEngine.score`; bundled model, quant_policy 0, {args.threads} torch threads. "
            f"Reference: `{EXACT}` (the exact path). Greedy: {len(GEN_PROMPTS)} chat prompts, "
            f"{args.gen_tokens} tokens. Guard for the defaults (`auto/auto`): perplexity within "
            f"1%, top-1 agreement >= 0.97. {elapsed:.0f} s in all.\n\n{table}",
        )


if __name__ == "__main__":
    main()
