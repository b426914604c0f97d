"""This engine against llama.cpp on the CPU, on the same GGUF file and the same token ids.

Runs back to back in one process (llama.cpp through llama-cpp-python, 2 threads):

1. one chat stream: ``--decode-tokens`` greedy tokens after a chat prompt; decode tokens/s
   (after the first token) and time to first token;
2. a shared-system-prompt batch: ``--batch`` requests sharing a ~``--system-tokens``-token
   system prompt, each with its own question, ``--batch-tokens`` greedy tokens each; output
   tokens/s. This engine runs them together (continuous batching, prefix caching); llama.cpp
   runs them one after the other through ``Llama.generate``, which reuses the KV of the prompt
   prefix shared with the previous request (its own prefix cache);
3. prefix caching on vs off for this engine alone (``--cache-system-tokens`` shared prompt);
4. with ``--rss``: peak RSS of ``llm-serve serve`` (the bundled model, a 256-block KV pool,
   one request served) with float32 weights as loaded and with the defaults.

Both sides get identical token ids (the chat template applied by this engine's tokenizer).
llama-cpp-python is a benchmark-only dependency, never installed by CI; install it into the
workspace environment with ``uv pip install "llama-cpp-python>=0.3"`` (it compiles llama.cpp:
a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from common import bar_plot, markdown_table, record, save_json, wait_healthy

from paged_engine import EngineConfig, LLMEngine, SamplingParams
from paged_engine.model_loader import bundled_gguf_path

SYSTEM_RULE = (
    "You are a patient assistant for a city library. Answer in plain words, cite the shelf "
    "section when you mention a book, and never invent titles or authors. "
)
QUESTIONS = [
    "How do I renew a book?", "What are the opening hours?", "Can I print documents?",
    "Where is the children's section?", "Do you lend e-readers?", "How do I join?",
    "Is there free Wi-Fi?", "Can I book a study room?", "Do you have audiobooks?",
    "What is the late fee?", "Can I donate books?", "Do you run reading groups?",
    "Where are the newspapers?", "Can I borrow a laptop?", "Do you have a quiet floor?",
    "How many books can I borrow?",
]


def chat(engine: LLMEngine, system: str, user: str) -> list[int]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    out = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]


def system_prompt(engine: LLMEngine, tokens: int) -> str:
    text = ""
    while len(engine.tokenizer.encode(text)) < tokens:
        text += SYSTEM_RULE
    return text


def engine_stream(engine: LLMEngine, ids: list[int], n: int) -> tuple[float, float]:
    """(TTFT s, decode tok/s) of one greedy request."""
    engine.add_request("stream", ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    t0 = time.perf_counter()
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            if first is None and out.token_ids:
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None
    return first - t0, (n - 1) / (end - first)


def llama_stream(llm: Any, ids: list[int], n: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    first = None
    gen = llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
    for count, _tok in enumerate(gen, 1):
        if first is None:
            first = time.perf_counter()
        if count == n:
            break
    end = time.perf_counter()
    assert first is not None
    return first - t0, (n - 1) / (end - first)


def engine_batch(engine: LLMEngine, prompts: list[list[int]], n: int) -> float:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t
    return sum(len(o.token_ids) for o in outs) / wall


def llama_batch(llm: Any, prompts: list[list[int]], n: int) -> float:
    llm.reset()
    t = time.perf_counter()
    total = 0
    for ids in prompts:
        for count, _tok in enumerate(
            llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True), 1
        ):
            total += 1
            if count == n:
                break
    return total / (time.perf_counter() - t)


def serve_peak_rss(extra: list[str]) -> float:
    """Peak RSS (MiB) of `llm-serve serve` on the bundled model after serving one request."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llm_serve.cli", "serve", "default", "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", lambda: proc.poll() is None, timeout=600)
        body = {"model": "default", "prompt": "Hello", "max_tokens": 8}
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
        with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=430)
    ap.add_argument("--batch-tokens", type=int, default=32)
    ap.add_argument("--cache-system-tokens", type=int, default=265)
    ap.add_argument("--repeats", type=int, default=3, help="single-stream runs (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--weight-quant", default="auto", help="auto, int8, int4 or none")
    ap.add_argument("--rss", action="store_true", help="also measure llm-serve's peak RSS")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit(
            'llama-cpp-python is not installed: uv pip install "llama-cpp-python>=0.3" (a '
            "benchmark-only dependency; it compiles llama.cpp)"
        ) from None
    torch.set_num_threads(args.threads)
    wq = None if args.weight_quant == "none" else args.weight_quant

    def make(**kw: Any) -> LLMEngine:
        return LLMEngine(
            EngineConfig(model="default", device="cpu", dtype=args.dtype, weight_quant=wq, num_blocks=2048, **kw)
        )

    engine = make()
    setting = f"dtype {str(engine.dtype).removeprefix('torch.')}, weight_quant {engine.weight_quant}"
    stream_ids = chat(engine, "You are a helpful assistant.", "Write a long story about a lighthouse keeper.")
    system = system_prompt(engine, args.system_tokens)
    prompts = [chat(engine, system, QUESTIONS[i % len(QUESTIONS)]) for i in range(args.batch)]
    gguf = str(bundled_gguf_path())
    llm = Llama(model_path=gguf, n_threads=args.threads, n_ctx=4096, n_batch=512, verbose=False)

    # 1. one stream (a warm-up run each, then the median of --repeats)
    engine_stream(engine, stream_ids, 8)
    llama_stream(llm, stream_ids, 8)
    e_runs, l_runs = [], []
    for _ in range(args.repeats):
        engine.reset_prefix_cache()
        e_runs.append(engine_stream(engine, stream_ids, args.decode_tokens))
        l_runs.append(llama_stream(llm, stream_ids, args.decode_tokens))
    e_ttft, e_tps = (statistics.median(x) for x in zip(*e_runs, strict=True))
    l_ttft, l_tps = (statistics.median(x) for x in zip(*l_runs, strict=True))
    del engine

    # 2. shared system prompt, cold caches on both sides
    e_batch = engine_batch(make(), prompts, args.batch_tokens)
    l_batch = llama_batch(llm, prompts, args.batch_tokens)
    del llm

    # 3. prefix caching on vs off (this engine)
    engine_off = make(enable_prefix_caching=False)
    system_c = system_prompt(engine_off, args.cache_system_tokens)
    prompts_c = [chat(engine_off, system_c, QUESTIONS[i % len(QUESTIONS)]) for i in range(args.batch)]
    off = engine_batch(engine_off, prompts_c, args.batch_tokens)
    del engine_off
    on = engine_batch(make(), prompts_c, args.batch_tokens)

    rows = [
        ["one stream: decode tok/s", e_tps, l_tps, e_tps / l_tps],
        ["one stream: TTFT s", e_ttft, l_ttft, l_ttft / e_ttft],
        [f"{args.batch} req, ~{args.system_tokens}-tok shared prompt: output tok/s", e_batch, l_batch, e_batch / l_batch],
    ]
    table = markdown_table(["workload", "this engine", "llama.cpp", "ratio (engine / llama.cpp, TTFT inverted)"], rows)
    cache_table = markdown_table(
        ["prefix caching", "output tok/s"], [["off", off], ["on", on], ["on / off", on / off]]
    )
    data: dict[str, Any] = {
        "setting": setting,
        "stream": {"engine": e_runs, "llama_cpp": l_runs},
        "batch": {"engine": e_batch, "llama_cpp": l_batch},
        "cache": {"off": off, "on": on},
        "prompt_tokens": {"stream": len(stream_ids), "batch": [len(p) for p in prompts], "cache": len(prompts_c[0])},
    }
    rss_table = ""
    if args.rss:
        # A fixed KV pool (256 blocks), so the figure shows the weights, not the 4 GiB default
        # pool that CPU serving allocates up front.
        pool = ["--num-blocks", "256"]
        rss = {
            name: serve_peak_rss([*flags, *pool])
            for name, flags in (
                ("float32 weights as loaded (the old default)", ["--weight-quant", "none", "--dtype", "float32"]),
                ("defaults (bf16, int4)", []),
            )
        }
        data["serve_peak_rss_mib"] = rss
        rss_table = markdown_table(["llm-serve serve default", "peak RSS MiB"], [[k, v] for k, v in rss.items()])
    print(table, cache_table, rss_table, sep="\n\n")
    save_json("cpu_vs_llamacpp", data)
    bar_plot(
        "cpu_vs_llamacpp",
        "this engine vs llama.cpp (CPU, same GGUF)",
        ["one stream decode tok/s", "shared-prompt batch tok/s"],
        {"this engine": [e_tps, e_batch], "llama.cpp": [l_tps, l_batch]},
        "tokens/s",
    )
    if not args.no_record:
        record(
            "CPU: this engine vs llama.cpp",
            f"Bundled SmolLM2-135M-Instruct, the same `SmolLM2-135M-Instruct.Q4_1.gguf` for both; "
            f"llama-cpp-python {__import__('llama_cpp').__version__}, {args.threads} threads each; "
            f"this engine: {setting}. Identical token ids (chat template of this engine's "
            f"tokenizer), greedy. One stream: {len(stream_ids)} prompt tokens, "
            f"{args.decode_tokens} generated, median of {args.repeats}. Batch: {args.batch} "
            f"requests of ~{len(prompts[0])} tokens ({args.system_tokens}-token shared system "
            f"prompt), {args.batch_tokens} tokens each, cold caches; llama.cpp serves them in turn "
            f"reusing the shared prefix. Prefix caching on/off: {args.batch} requests of "
            f"~{len(prompts_c[0])} tokens.\n\n{table}\n\n{cache_table}\n\n{rss_table}\n\n"
            f"JSON: `benchmarks/results/cpu_vs_llamacpp.json`; plot: "
            f"`benchmarks/results/cpu_vs_llamacpp.png`.",
        )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
