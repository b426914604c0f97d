"""Shared-system-prompt throughput: this engine (prefix caching on/off, quant_policy 0/8/4, int4 in both key layouts)
against transformers `generate` one request at a time and transformers continuous batching
(`generate_batch`), on the same prompts, in one process.

Workload (sizes are flags): N requests that share a ~450-token system prompt, each with a
distinct ~20-token question, greedy, a fixed number of output tokens, all arriving at t=0 on a
cold cache (a fresh engine per configuration). Reports output tokens/s, mean and p99
time-to-first-token, and ratios. Targets on a 2-core CPU: prefix caching on >= 5x the throughput
of HF `generate` one at a time, and >= 3x the throughput and <= 1/5 the mean TTFT of prefix
caching off.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from common import bar_plot, markdown_table, record, save_json

from paged_engine import EngineConfig, LLMEngine, SamplingParams
from paged_engine.model_loader import resolve_model

TOPICS = [
    "the water cycle", "binary search", "photosynthesis", "the French revolution", "TCP handshakes",
    "compound interest", "black holes", "sourdough bread", "the immune system", "hash tables",
    "plate tectonics", "jazz harmony", "vaccines", "the stock market", "quantum entanglement",
    "recycling plastics", "the Roman empire", "neural networks", "bird migration", "tides",
    "electric cars", "coffee roasting", "the printing press", "volcanoes", "public key crypto",
    "chess openings", "glaciers", "the human heart", "solar panels", "the Silk Road",
    "rainbows", "garbage collection",
]


def system_prompt(tokenizer: Any, target: int) -> str:
    rules = [
        "You are a careful, friendly assistant for a public library's help desk.",
        "Answer in plain language a curious teenager can follow, in at most three short paragraphs.",
        "When a question mixes several topics, address each one separately and say how they connect.",
        "Prefer concrete examples over abstract definitions, and give one everyday analogy.",
        "If you are unsure, say so, and suggest what kind of book or expert could settle it.",
        "Never invent citations, page numbers, statistics or quotations.",
        "Keep a neutral tone on contested subjects and present the main positions fairly.",
        "Use metric units first and give imperial units in parentheses where helpful.",
    ]
    text, i = "", 0
    while len(tokenizer.encode(text)) < target:
        text += f"Rule {i + 1}: {rules[i % len(rules)]}\n"
        i += 1
    return text


def build_prompts(tokenizer: Any, n: int, system_tokens: int) -> list[list[int]]:
    system = system_prompt(tokenizer, system_tokens)
    out = []
    for i in range(n):
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {i + 1}: in two sentences, what is {TOPICS[i % len(TOPICS)]}?"},
        ]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return out


def summarize(name: str, wall: float, ttfts: list[float], out_tokens: int) -> dict[str, Any]:
    ttfts = sorted(ttfts)
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {
        "config": name,
        "wall_s": wall,
        "output_tokens": out_tokens,
        "tok_per_s": out_tokens / wall,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p99_s": p99,
    }


def run_engine(name: str, prompts: list[list[int]], max_tokens: int, **cfg: Any) -> dict[str, Any]:
    engine = LLMEngine(EngineConfig(model="default", device="cpu", **cfg))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    engine.reset_prefix_cache()  # cold cache for the measured run
    t0 = time.monotonic()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params, arrival_time=t0)
    done: dict[str, Any] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    wall = time.monotonic() - t0
    outs = list(done.values())
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
    res = summarize(name, wall, [o.first_token_time - t0 for o in outs], sum(len(o.token_ids) for o in outs))
    st = engine.stats()
    res["hit_rate"] = st.prefix_cache_hit_rate
    res["tokens"] = {o.request_id: o.token_ids for o in outs}
    print(f"  {name}: {res['tok_per_s']:.1f} tok/s, mean TTFT {res['ttft_mean_s']:.2f} s, hit rate {st.prefix_cache_hit_rate:.0%}")
    return res


class FirstTokenTimer:
    """A `generate` streamer that records when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt
            self.first = time.monotonic()

    def end(self) -> None:
        pass


def run_hf_sequential(model: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    t0 = time.monotonic()
    ttfts, total = [], 0
    for p in prompts:
        timer = FirstTokenTimer()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                streamer=timer, pad_token_id=0,
            )
        total += out.shape[1] - len(p)
        assert timer.first is not None
        ttfts.append(timer.first - t0)
    res = summarize("HF generate, one at a time", time.monotonic() - t0, ttfts, total)
    print(f"  {res['config']}: {res['tok_per_s']:.1f} tok/s")
    return res


def run_hf_batch(model: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    with torch.no_grad():
        outs = model.generate_batch(prompts, generation_config=gen, record_timestamps=True, warmup=False)
    wall = time.perf_counter() - t0
    results = list(outs.values())
    ttfts = [r.timestamps[0] - t0 for r in results if r.timestamps]
    res = summarize("HF generate_batch (continuous batching)", wall, ttfts or [float("nan")], sum(len(r.generated_tokens) for r in results))
    print(f"  {res['config']}: {res['tok_per_s']:.1f} tok/s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=450)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true", help="only this engine's configurations")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()

    torch.manual_seed(0)
    source = resolve_model("default")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir, local_files_only=True)
    prompts = build_prompts(tokenizer, args.requests, args.system_tokens)
    lens = [len(p) for p in prompts]
    print(f"{len(prompts)} prompts, {min(lens)}-{max(lens)} tokens, {args.max_tokens} output tokens each")

    results = [
        run_engine("prefix caching on", prompts, args.max_tokens),
        run_engine("prefix caching off", prompts, args.max_tokens, enable_prefix_caching=False),
        run_engine("prefix caching on, int8 KV", prompts, args.max_tokens, quant_policy=8),
        run_engine("prefix caching on, int4 KV (block-channel keys)", prompts, args.max_tokens, quant_policy=4),
        run_engine(
            "prefix caching on, int4 KV (token keys)", prompts, args.max_tokens, quant_policy=4, kv_int4_layout="token"
        ),
    ]
    if not args.skip_hf:
        hf = AutoModelForCausalLM.from_pretrained(source.weights_dir, dtype=torch.float32, local_files_only=True).eval()
        results.append(run_hf_sequential(hf, prompts, args.max_tokens))
        try:
            results.append(run_hf_batch(hf, prompts, args.max_tokens))
        except Exception as exc:  # report, do not hide: the table says why it is missing
            print(f"  HF generate_batch failed: {type(exc).__name__}: {exc}")
    on, off = results[0], results[1]
    same = sum(on["tokens"][k] == off["tokens"][k] for k in on["tokens"])
    base = next((r for r in results if r["config"].startswith("HF generate, one")), None)
    rows = []
    for r in results:
        rows.append([
            r["config"], r["tok_per_s"], r["ttft_mean_s"], r["ttft_p99_s"], r["wall_s"],
            r["tok_per_s"] / base["tok_per_s"] if base else float("nan"),
            f"{r['hit_rate']:.0%}" if "hit_rate" in r else "-",
        ])
    headers = ["configuration", "output tok/s", "mean TTFT s", "p99 TTFT s", "wall s", "x HF one-at-a-time", "hit rate"]
    table = markdown_table(headers, rows)
    thr_ratio = on["tok_per_s"] / off["tok_per_s"]
    ttft_ratio = on["ttft_mean_s"] / off["ttft_mean_s"]
    summary = (
        f"caching on vs off: {thr_ratio:.2f}x throughput (target >= 3x), mean TTFT ratio "
        f"{ttft_ratio:.3f} (target <= 0.2); "
        + (f"vs HF generate one at a time: {on['tok_per_s'] / base['tok_per_s']:.2f}x (target >= 5x); " if base else "")
        + f"greedy outputs identical with caching on and off for {same}/{len(on['tokens'])} requests."
    )
    print(table)
    print(summary)
    for r in results:
        r.pop("tokens", None)
    save_json("engine_throughput", {"args": vars(args), "results": results, "summary": summary})
    png = bar_plot(
        "engine_throughput", "Shared-system-prompt workload (bundled SmolLM2-135M)",
        [r["config"].replace("prefix caching", "caching").replace(" (continuous batching)", "") for r in results],
        {"output tok/s": [r["tok_per_s"] for r in results]}, "output tokens / s",
    )
    print(f"saved {png}")
    if not args.no_record:
        record(
            "paged-engine: shared-system-prompt throughput",
            f"{len(prompts)} requests at t=0, cold cache, prompts {min(lens)}-{max(lens)} tokens "
            f"(a ~{args.system_tokens}-token shared system prompt + a distinct question, chat "
            f"template), {args.max_tokens} greedy output tokens, float32, bundled SmolLM2-135M.\n\n"
            f"{table}\n\n{summary}",
        )


if __name__ == "__main__":
    main()
