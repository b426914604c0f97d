"""``llm-serve bench``: a load generator for any OpenAI-compatible server.

Workload: ``num_prefixes`` shared prefixes of ``prefix_len`` words; request ``i`` takes prefix
``i % num_prefixes`` followed by ``suffix_len`` words of its own, and asks for ``output_len``
tokens. Lengths are in words, which approximate tokens (a real tokenizer makes a few tokens of
some words; the server's ``usage`` gives the exact counts, which the report uses). Words are
drawn from a seeded random vocabulary, so a seed gives the same prompts on every run.

Requests are streamed (``stream: true`` with ``stream_options.include_usage``), sent as a
Poisson process of ``request_rate`` per second (``inf``: all at once) and capped at
``max_concurrency`` in flight. Per request: TTFT (send to the first streamed text), ITL (gaps
between text chunks), TPOT ((E2E - TTFT) / (output tokens - 1)) and E2E; the server-reported
cached-token share is ``sum(usage.prompt_tokens_details.cached_tokens) / sum(prompt_tokens)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import string
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx
from tqdm import tqdm  # type: ignore[import-untyped]

__all__ = [
    "BenchConfig",
    "BenchError",
    "RequestResult",
    "format_report",
    "make_workload",
    "percentile",
    "run_bench",
    "save_results",
    "summarize",
]

PLOT_MISSING = (
    "--save draws a PNG with matplotlib, which is not installed; install it "
    "(pip install 'llm-serve[plot]' or pip install matplotlib) or leave out --save"
)


class BenchError(RuntimeError):
    """The benchmark could not run (server unreachable, unauthorized, no model)."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to send, and where (see the module docstring)."""

    url: str
    api_key: str | None = None
    model: str | None = None
    endpoint: Literal["completions", "chat"] = "completions"
    num_prefixes: int = 4
    prefix_len: int = 256
    suffix_len: int = 32
    output_len: int = 64
    num_requests: int = 64
    request_rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout: float = 600.0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("num_prefixes", "output_len", "num_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefix_len", "suffix_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prefix_len + self.suffix_len < 1:
            raise ValueError("prompts would be empty: prefix_len + suffix_len must be >= 1")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")

    @property
    def base_url(self) -> str:
        """The server's root URL (``url`` without a trailing ``/`` or ``/v1``)."""
        url = self.url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclasses.dataclass
class RequestResult:
    """One request's outcome. Times are seconds; ``start`` / ``end`` / ``chunk_times`` are
    relative to the benchmark's start."""

    index: int
    prefix: int
    start: float = 0.0
    end: float = 0.0
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    chunk_times: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# -- workload ---------------------------------------------------------------------------------------


def _vocabulary(rng: random.Random, size: int = 4096) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))))
    return sorted(words)


def make_workload(config: BenchConfig) -> list[tuple[int, str, str]]:
    """``(prefix index, shared prefix, own suffix)`` for each request, from ``config.seed``."""
    rng = random.Random(config.seed)
    vocab = _vocabulary(rng)
    prefixes = [
        " ".join(rng.choices(vocab, k=config.prefix_len)) for _ in range(config.num_prefixes)
    ]
    out: list[tuple[int, str, str]] = []
    for i in range(config.num_requests):
        k = i % config.num_prefixes
        suffix = " ".join(rng.choices(vocab, k=config.suffix_len))
        out.append((k, prefixes[k], suffix))
    return out


def _body(config: BenchConfig, model: str, prefix: str, suffix: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": config.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "chat":
        messages = []
        if prefix:
            messages.append({"role": "system", "content": prefix})
        messages.append({"role": "user", "content": suffix or "Go on."})
        body["messages"] = messages
    else:
        body["prompt"] = f"{prefix}\n{suffix}" if prefix and suffix else prefix or suffix
    return body


# -- running ------------------------------------------------------------------------------------------


def _headers(config: BenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


async def _discover_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    try:
        r = await client.get(f"{config.base_url}/v1/models", headers=_headers(config))
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {config.base_url}: {exc}") from None
    if r.status_code == 401:
        raise BenchError(
            f"{config.base_url} wants an API key: pass --api-key"
            if not config.api_key
            else f"{config.base_url} refused the API key (401)"
        )
    if r.status_code != 200:
        raise BenchError(f"GET /v1/models answered {r.status_code}: {r.text[:300]}")
    data = r.json().get("data") or []
    if not data:
        raise BenchError("GET /v1/models lists no model; pass --model")
    return str(data[0]["id"])


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    parts: list[str] = []
    for choice in chunk.get("choices") or []:
        if chat:
            parts.append((choice.get("delta") or {}).get("content") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)


async def _one(
    client: httpx.AsyncClient,
    config: BenchConfig,
    model: str,
    result: RequestResult,
    prefix: str,
    suffix: str,
    t0: float,
) -> None:
    chat = config.endpoint == "chat"
    url = f"{config.base_url}/v1/{'chat/completions' if chat else 'completions'}"
    body = _body(config, model, prefix, suffix)
    start = time.perf_counter()
    result.start = start - t0
    last: float | None = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=_headers(config)) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                raise BenchError(f"HTTP {r.status_code}: {text[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchError(str(chunk["error"].get("message", chunk["error"])))
                now = time.perf_counter()
                if _chunk_text(chunk, chat):
                    chunks += 1
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.chunk_times.append(now - t0)
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    cached = details.get("cached_tokens")
                    result.cached_tokens = None if cached is None else int(cached)
        if result.prompt_tokens is None:  # the server sent no usage chunk
            result.output_tokens = chunks
        result.ok = True
    except (httpx.HTTPError, BenchError, ValueError, KeyError) as exc:
        result.error = str(exc) or type(exc).__name__
    finally:
        result.end = time.perf_counter() - t0


async def _run(config: BenchConfig, out: TextIO) -> tuple[str, float, list[RequestResult]]:
    workload = make_workload(config)
    rng = random.Random(config.seed + 1)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout, connect=min(config.timeout, 30.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = config.model or await _discover_model(client, config)
        gate = asyncio.Semaphore(config.max_concurrency or len(workload))
        results = [RequestResult(index=i, prefix=k) for i, (k, _, _) in enumerate(workload)]
        bar = tqdm(
            total=len(workload), desc="requests", unit="req", disable=not config.progress, file=out
        )

        async def task(i: int, t0: float) -> None:
            _k, prefix, suffix = workload[i]
            async with gate:
                await _one(client, config, model, results[i], prefix, suffix, t0)
            bar.update(1)

        t0 = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        try:
            for i in range(len(workload)):
                tasks.append(asyncio.ensure_future(task(i, t0)))
                if math.isfinite(config.request_rate) and i + 1 < len(workload):
                    await asyncio.sleep(rng.expovariate(config.request_rate))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            bar.close()
        duration = time.perf_counter() - t0
    return model, duration, results


def run_bench(
    config: BenchConfig, progress_file: TextIO | None = None
) -> tuple[str, float, list[RequestResult]]:
    """Run the benchmark: ``(model, duration in seconds, per-request results)``. Raises
    ``BenchError`` when the server cannot be used at all."""
    return asyncio.run(_run(config, progress_file or sys.stderr))


# -- figures ------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default); NaN when
    ``values`` is empty."""
    if not values:
        return math.nan
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _dist(values: Sequence[float]) -> dict[str, float | None]:
    def clean(x: float) -> float | None:
        return None if math.isnan(x) else x * 1000.0

    mean = sum(values) / len(values) if values else math.nan
    return {
        "mean_ms": clean(mean),
        "p50_ms": clean(percentile(values, 50)),
        "p99_ms": clean(percentile(values, 99)),
        "count": len(values),
    }


def summarize(
    config: BenchConfig, model: str, duration: float, results: Sequence[RequestResult]
) -> dict[str, Any]:
    """The report's figures as a JSON-ready dict (latencies in milliseconds)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    with_usage = [r for r in ok if r.prompt_tokens is not None and r.cached_tokens is not None]
    usage_prompt = sum(r.prompt_tokens or 0 for r in with_usage)
    cached = sum(r.cached_tokens or 0 for r in with_usage)
    span = max(duration, 1e-9)
    return {
        "model": model,
        "endpoint": f"/v1/{'chat/completions' if config.endpoint == 'chat' else 'completions'}",
        "config": {
            k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in dataclasses.asdict(config).items()
            if k not in ("api_key", "progress")
        },
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / span,
        "output_token_throughput": out_tokens / span,
        "total_token_throughput": (out_tokens + prompt_tokens) / span,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "cached_tokens": cached if with_usage else None,
        "cached_token_share": cached / usage_prompt if usage_prompt else None,
        "ttft": _dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot": _dist([t for r in ok if (t := r.tpot) is not None]),
        "itl": _dist([x for r in ok for x in r.itl]),
        "e2e": _dist([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


def format_report(summary: dict[str, Any]) -> str:
    """The summary as the text table ``llm-serve bench`` prints."""

    def num(x: float | None, fmt: str = "{:.2f}") -> str:
        return "n/a" if x is None else fmt.format(x)

    share = summary["cached_token_share"]
    cached = summary["cached_tokens"]
    rows = [
        ("Model", summary["model"]),
        ("Endpoint", summary["endpoint"]),
        ("Successful requests", str(summary["completed"])),
        ("Failed requests", str(summary["failed"])),
        ("Duration (s)", num(summary["duration_s"])),
        ("Request throughput (req/s)", num(summary["request_throughput"])),
        ("Output token throughput (tok/s)", num(summary["output_token_throughput"])),
        ("Total token throughput (tok/s)", num(summary["total_token_throughput"])),
        ("Prompt tokens", str(summary["prompt_tokens"])),
        ("Output tokens", str(summary["output_tokens"])),
        (
            "Cached prompt tokens (server)",
            "n/a (no usage.prompt_tokens_details)"
            if share is None
            else f"{cached} ({100.0 * share:.1f}%)",
        ),
    ]
    width = max(len(k) for k, _ in rows) + 2
    lines = ["=" * 20 + " llm-serve bench " + "=" * 20]
    lines += [f"{k + ':':<{width}}{v}" for k, v in rows]
    lines.append("-" * 20 + " latency (ms) " + "-" * 23)
    lines.append(f"{'':<8}{'mean':>12}{'p50':>12}{'p99':>12}")
    for key in ("ttft", "tpot", "itl", "e2e"):
        d = summary[key]
        lines.append(
            f"{key.upper():<8}{num(d['mean_ms']):>12}{num(d['p50_ms']):>12}{num(d['p99_ms']):>12}"
        )
    lines.append("=" * 57)
    if summary["errors"]:
        lines.append("errors: " + "; ".join(summary["errors"]))
    return "\n".join(lines)


def check_plotting() -> None:
    """Raise ``BenchError`` with an install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(PLOT_MISSING) from None


def save_results(
    directory: Path, summary: dict[str, Any], results: Sequence[RequestResult]
) -> list[Path]:
    """Write ``bench.json`` (summary and per-request records) and ``bench.png`` (latency
    distributions and throughput over time) into ``directory``; returns the paths."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "index": r.index,
            "prefix": r.prefix,
            "ok": r.ok,
            "error": r.error,
            "start_s": r.start,
            "ttft_s": r.ttft,
            "tpot_s": r.tpot,
            "e2e_s": r.e2e,
            "itl_s": r.itl,
            "output_tokens": r.output_tokens,
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
        }
        for r in results
    ]
    json_path = directory / "bench.json"
    json_path.write_text(json.dumps({"summary": summary, "requests": records}, indent=2) + "\n")

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels: list[tuple[Any, list[float], str]] = [
        (axes[0][0], [r.ttft * 1000 for r in ok if r.ttft is not None], "TTFT (ms)"),
        (axes[0][1], [t * 1000 for r in ok if (t := r.tpot) is not None], "TPOT (ms)"),
        (axes[1][0], [r.e2e * 1000 for r in ok], "E2E latency (ms)"),
    ]
    for ax, values, label in panels:
        if values:
            ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue", alpha=0.8)
            for q, style in ((50, "--"), (99, ":")):
                ax.axvline(percentile(values, q), color="black", linestyle=style, label=f"p{q}")
            ax.legend()
        ax.set_xlabel(label)
        ax.set_ylabel("requests")
    ax = axes[1][1]
    times = sorted(t for r in ok for t in r.chunk_times)
    if times:
        span = max(times[-1], 1e-3)
        nbins = max(1, min(50, len(times) // 4))
        width = span / nbins
        counts = [0] * nbins
        for t in times:
            counts[min(int(t / width), nbins - 1)] += 1
        ax.plot([(i + 0.5) * width for i in range(nbins)], [c / width for c in counts])
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("streamed chunks / s (about tokens / s)")
    share = summary["cached_token_share"]
    fig.suptitle(
        f"{summary['model']}: {summary['completed']} requests, "
        f"{summary['output_token_throughput']:.1f} output tok/s"
        + ("" if share is None else f", cached share {100 * share:.1f}%")
    )
    fig.tight_layout()
    png_path = directory / "bench.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [json_path, png_path]
