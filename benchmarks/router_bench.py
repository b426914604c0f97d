"""Routing between engine replicas: the prefix-index router against round-robin and one engine.

Workload (sizes are flags): P system prompts (~400 tokens each, distinct from their first
token) x T user turns each, sent as streaming chat completions (greedy, a few output tokens)
at a fixed arrival rate, interleaved (turn 0 of every system prompt, then turn 1, ...), so
consecutive requests never share a prefix. The same requests go, in the same order and on a
cold cache, to:

- `index`: 2 replicas on Ray Serve, routed by their real prefix-index events (this project);
- `round-robin`: the same 2 replicas, taken in turn;
- `single`: one engine (`llm-serve serve`, its own process; the upper bound on hit rate:
  nothing is split).

Reports the cluster-wide prefix-cache hit rate (from `/v1/cache/stats`, prompt tokens served
from the cache / prompt tokens) and mean / p50 / p99 time to first token measured by the client.
Targets: index hit rate >= 0.9x single's and >= 1.5x round-robin's; index mean TTFT below
round-robin's. Both replicas share this machine's cores, so throughput does not scale here.

Ray Serve's own `PrefixCacheAffinityRouter` (`ray.serve.llm`) is tried when it imports; it needs
`ray[llm]` (pyarrow and vLLM, a GPU stack), so on a CPU-only install the script says why it
was skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from common import bar_plot, markdown_table, record, save_json, wait_healthy

from llm_serve.ray_serve import require_ray  # first: sets Ray's environment defaults

WORDS = [
    "library", "patron", "catalogue", "archive", "request", "renewal", "reference",
    "periodical", "microfilm", "interlibrary", "loan", "reading", "room", "quiet", "policy",
    "guest", "wifi", "printer", "scanner", "volunteer", "children", "story", "hour", "exhibit",
    "donation", "membership", "card", "fine", "overdue", "hold", "shelf", "biography", "novel",
    "atlas", "encyclopedia", "journal", "database", "citation", "research", "workshop",
]


def system_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"Assistant {k}: you answer questions for branch {k} of the city library. "
        + " ".join(rng.choice(WORDS) for _ in range(words))
        for k in range(n)
    ]


def workload(prompts: list[str], turns: int, seed: int) -> list[list[dict[str, str]]]:
    """Turn t of every system prompt, in a shuffled order, then turn t + 1, ... (a fixed order
    would let round-robin over an even number of replicas keep every prompt on one replica)."""
    rng = random.Random(seed + 1)
    out = []
    for t in range(turns):
        order = list(range(len(prompts)))
        rng.shuffle(order)
        for k in order:
            out.append(
                [
                    {"role": "system", "content": prompts[k]},
                    {"role": "user", "content": f"Question {t} for branch {k}: when do you open?"},
                ]
            )
    return out


async def run_load(
    url: str, model: str, requests: list[list[dict[str, str]]], rate: float, max_tokens: int
) -> list[float]:
    """Send every request at ``rate`` per second; return each one's time to first token."""
    ttfts: list[float] = [0.0] * len(requests)

    async def one(i: int, messages: list[dict[str, str]], client: httpx.AsyncClient) -> None:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        start = time.perf_counter()
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"request {i}: {r.status_code} {await r.aread()!r}")
            async for line in r.aiter_lines():  # read to the end: the request then finishes
                if ttfts[i] or not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                if choice.get("delta", {}).get("content") or choice.get("finish_reason"):
                    ttfts[i] = time.perf_counter() - start

    async with httpx.AsyncClient(timeout=600) as client:
        tasks = []
        for i, messages in enumerate(requests):
            tasks.append(asyncio.ensure_future(one(i, messages, client)))
            await asyncio.sleep(1.0 / rate)
        await asyncio.gather(*tasks)
    return ttfts


def cache_figures(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(url + "/v1/cache/stats", timeout=60).json()
    return body


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yields its URL."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, thread.is_alive)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


@contextmanager
def engine_process(config: Any) -> Iterator[str]:
    """One engine in its own process (`llm-serve serve`), as each replica is: the client and
    the engine do not share an interpreter."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "llm_serve.cli", "serve", config.model, "--port", str(port),
           "--served-model-name", "bench", "--device", "cpu", "--log-stats-interval", "0",
           "--log-level", "warning", "--seed", str(config.seed)]  # fmt: skip
    if config.num_blocks is not None:
        cmd += ["--num-blocks", str(config.num_blocks)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, lambda: proc.poll() is None)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def measure(name: str, url: str, args: argparse.Namespace, requests: list[Any]) -> dict[str, Any]:
    # Warm up every engine (first calls into torch are slow) on unrelated prompts, then empty
    # every cache: each router starts cold on the same requests.
    warmup = [[{"role": "user", "content": f"warm-up {i}"}] for i in range(4 * args.replicas)]
    asyncio.run(run_load(url, "bench", warmup, 4 * args.rate, args.max_tokens))
    httpx.post(url + "/v1/cache/reset", json={}, timeout=60)
    before = cache_figures(url)
    t0 = time.perf_counter()
    ttfts = asyncio.run(run_load(url, "bench", requests, args.rate, args.max_tokens))
    elapsed = time.perf_counter() - t0
    time.sleep(1.5)  # the replicas' stats reach the ingress by long polling
    after = cache_figures(url)
    queried = after["prefix_cache_queried_tokens"] - before["prefix_cache_queried_tokens"]
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    ttfts.sort()
    row = {
        "router": name,
        "requests": len(requests),
        "hit_rate": hits / queried if queried else 0.0,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "seconds": elapsed,
        "per_replica_finished": {
            r["replica"]: r["num_finished"] - next(
                (b["num_finished"] for b in before.get("replicas", []) if b["replica"] == r["replica"]),
                0,
            )
            for r in after.get("replicas", [])
        },
    }
    print(f"{name}: hit rate {row['hit_rate']:.3f}, mean TTFT {row['ttft_mean_s']:.3f} s", flush=True)
    return row


def affinity_router_status() -> str:
    try:
        from ray.serve.llm.request_router import PrefixCacheAffinityRouter  # noqa: F401
    except Exception as exc:
        return (
            f"skipped: ray.serve.llm's PrefixCacheAffinityRouter does not import here "
            f"({type(exc).__name__}: {exc}); it needs the ray[llm] extra (pyarrow, vLLM: a GPU "
            "stack), which this CPU-only machine does not install"
        )
    return (
        "imports, but is not run: it routes by the text of vLLM-style LLM requests inside Ray "
        "Serve's handle, which this project's engine deployments do not take"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="model spec [default: the bundled SmolLM2-135M]")
    ap.add_argument("--prompts", type=int, default=8, help="system prompts")
    ap.add_argument("--turns", type=int, default=12, help="user turns per system prompt")
    ap.add_argument("--system-words", type=int, default=300, help="words per system prompt (~400 tokens)")
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--num-blocks", type=int, default=None, help="KV blocks per engine [default: auto]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny random model, 3 x 3 requests")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.turns, args.system_words, args.rate = 3, 3, 30, 4.0
        args.num_blocks = args.num_blocks or 256

    require_ray()
    import ray

    from llm_serve.ray_serve.app import build_routed_app
    from llm_serve.ray_serve.launch import deploy_replicas, start_ray
    from llm_serve.ray_serve.routed_engine import RoutedEngine
    from llm_serve.ray_serve.router import RoutingPolicy
    from llm_serve.state import ServerSettings
    from paged_engine import EngineConfig

    model = args.model
    if args.quick and model == "default":
        import json as _json
        import tempfile
        from pathlib import Path

        tiny = Path(tempfile.mkdtemp()) / "config.json"
        tiny.write_text(_json.dumps({
            "model_type": "llama", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "max_position_embeddings": 4096,
        }))  # fmt: skip
        model = f"dummy:{tiny}"
    config = EngineConfig(model=model, device="cpu", num_blocks=args.num_blocks, seed=args.seed)
    settings = ServerSettings(model_name="bench", log_interval=0)
    requests = workload(system_prompts(args.prompts, args.system_words, args.seed), args.turns, args.seed)

    rows: list[dict[str, Any]] = []
    started = start_ray()
    try:
        handles = deploy_replicas(config, args.replicas)
        for name, strategy in (("index", "prefix"), ("round-robin", "round_robin")):
            policy = RoutingPolicy(prefix_match_threshold=config.prefix_match_threshold, strategy=strategy)
            engine = RoutedEngine(handles, policy)
            with serving(build_routed_app(engine, settings)) as url:
                while not all(r.uid for r in engine.replicas.values()):
                    time.sleep(0.1)
                rows.append(measure(name, url, args, requests))
    finally:
        if started:
            ray.shutdown()
    with engine_process(config) as url:
        rows.append(measure("single", url, args, requests))

    by = {r["router"]: r for r in rows}
    index, rr, single = by["index"], by["round-robin"], by["single"]
    checks = {
        "index hit rate >= 0.9x single": index["hit_rate"] >= 0.9 * single["hit_rate"],
        "index hit rate >= 1.5x round-robin": index["hit_rate"] >= 1.5 * rr["hit_rate"],
        "index mean TTFT < round-robin": index["ttft_mean_s"] < rr["ttft_mean_s"],
    }
    table = markdown_table(
        ["router", "requests", "hit rate", "mean TTFT (s)", "p50 TTFT (s)", "p99 TTFT (s)", "wall (s)"],
        [[r["router"], r["requests"], r["hit_rate"], r["ttft_mean_s"], r["ttft_p50_s"], r["ttft_p99_s"],
          r["seconds"]] for r in rows],
    )  # fmt: skip
    affinity = affinity_router_status()
    print(table)
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {what}")
    print(f"Ray Serve PrefixCacheAffinityRouter: {affinity}")
    if args.quick:
        return  # a smoke run: nothing saved
    data = {"model": model, "args": vars(args), "rows": rows, "checks": checks, "affinity_router": affinity}
    save_json("router_bench", data)
    bar_plot(
        "router_bench",
        f"{args.prompts} system prompts x {args.turns} turns, {args.replicas} replicas",
        [r["router"] for r in rows],
        {"hit rate": [r["hit_rate"] for r in rows], "mean TTFT (s)": [r["ttft_mean_s"] for r in rows]},
        "hit rate / seconds",
    )
    if not args.no_record:
        body = table + "\n\n" + "\n".join(f"- {'PASS' if ok else 'MISS'}: {w}" for w, ok in checks.items())
        body += (
            f"\n- Ray Serve PrefixCacheAffinityRouter: {affinity}\n- both replicas share the "
            "machine's cores: the point is hit rate and TTFT, not throughput"
        )
        record("Router: prefix-index routing vs round-robin vs one engine", body)


if __name__ == "__main__":
    main()
