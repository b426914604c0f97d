"""Where an engine step's time goes on this machine: linear layers, attention (K/V write and
paged attention), sampling, and the rest (Python, norms, rotary, batch preparation).

For each configuration (``dtype/weight_quant``, e.g. ``float32/none`` = the exact path and
``auto/auto`` = the defaults) and each batch size, B chat requests are prefilled, then decode
steps are timed one by one with per-category timers, and the time to first token of one
``--ttft-tokens``-token prompt (no cache) is measured. Timers wrap modules and kvquant calls,
so they add a little overhead of their own; the per-step total is also taken without them.

The script passes only the options the installed engine knows, so it also profiles an older
checkout (run it with that checkout's packages on PYTHONPATH) for a before/after table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from common import bar_plot, markdown_table, record, save_json

import kvquant
from paged_engine import EngineConfig, LLMEngine, SamplingParams


def make_engine(model: str, dtype: str, weight_quant: str) -> LLMEngine:
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    kw: dict[str, Any] = {"model": model, "device": "cpu", "num_blocks": 1024, "dtype": dtype}
    if "weight_quant" in fields:
        kw["weight_quant"] = None if weight_quant == "none" else weight_quant
    elif weight_quant not in ("none", "auto"):
        raise SystemExit(f"this engine has no weight_quant; cannot run {weight_quant}")
    return LLMEngine(EngineConfig(**kw))


class Timers:
    """Accumulates wall time per category while installed."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._undo: list[Callable[[], None]] = []

    def wrap_module(self, module: torch.nn.Module, category: str) -> None:
        starts: list[float] = []
        h1 = module.register_forward_pre_hook(lambda *a: starts.append(time.perf_counter()))

        def post(*a: Any) -> None:
            self.total[category] += time.perf_counter() - starts.pop()

        h2 = module.register_forward_hook(post)
        self._undo += [h1.remove, h2.remove]

    def wrap_attr(self, owner: Any, name: str, category: str) -> None:
        fn = getattr(owner, name)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[category] += time.perf_counter() - t

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, fn))

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def install(engine: LLMEngine) -> Timers:
    timers = Timers()
    linear_types = tuple(
        t for t in (torch.nn.Linear, *_quantized_types()) if isinstance(t, type)
    )
    for module in engine.runner.model.modules():
        if isinstance(module, linear_types):
            timers.wrap_module(module, "linear")
    timers.wrap_attr(kvquant, "attention", "attention")
    timers.wrap_attr(kvquant, "write", "attention")
    timers.wrap_attr(engine, "sampler", "sampling")
    return timers


def _quantized_types() -> tuple[type, ...]:
    try:
        from paged_engine.weight_quant import Int4Linear, Int8Linear
    except ImportError:
        return ()
    return (Int4Linear, Int8Linear)


def chat_ids(engine: LLMEngine, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    out = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in ids]


def profile(engine: LLMEngine, batch: int, steps: int) -> dict[str, float]:
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(
            f"p{batch}-{i}", chat_ids(engine, f"Request {i}: tell me a long story."), params
        )
    while engine.stats().num_waiting or any(  # prefill everything first
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    plain: list[float] = []
    for _ in range(steps // 2):  # untimed categories: the true step time
        t = time.perf_counter()
        engine.step()
        plain.append(time.perf_counter() - t)
    timers = install(engine)
    timed: list[float] = []
    for _ in range(steps // 2):
        t = time.perf_counter()
        engine.step()
        timed.append(time.perf_counter() - t)
    timers.remove()
    for rid in [f"p{batch}-{i}" for i in range(batch)]:
        engine.abort(rid)
    engine.step()
    n = len(timed)
    row = {k: v / n * 1e3 for k, v in timers.total.items()}
    row["step_ms"] = statistics.median(plain) * 1e3
    row["timed_step_ms"] = sum(timed) / n * 1e3
    row["other"] = row["timed_step_ms"] - sum(row.get(k, 0.0) for k in ("linear", "attention", "sampling"))
    row["tok_per_s"] = batch / (row["step_ms"] / 1e3)
    return row


def ttft(engine: LLMEngine, tokens: int) -> float:
    ids = [(i * 7919) % 40000 + 100 for i in range(tokens)]  # no prefix-cache hit
    engine.add_request("ttft", ids, SamplingParams(max_tokens=1, temperature=0))
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--configs", nargs="+", default=["float32/none", "auto/auto"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ttft-tokens", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="", help="a tag for the table (e.g. 'before')")
    ap.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for cfg in args.configs:
        dtype, wq = cfg.split("/")
        engine = make_engine(args.model, dtype, wq)
        resolved = f"{str(engine.dtype).removeprefix('torch.')}/{getattr(engine, 'weight_quant', None)}"
        ttft(engine, 16)  # warm-up
        first = ttft(engine, args.ttft_tokens)
        for b in args.batch:
            row = profile(engine, b, args.steps)
            rows.append({"config": cfg, "resolved": resolved, "batch": b, "ttft_s": first, **row})
            print(rows[-1], flush=True)
        del engine
    headers = ["label", "config (resolved)", "batch", "step ms", "linear", "attention", "sampling", "other", "tok/s", f"TTFT {args.ttft_tokens} tok s"]
    table = markdown_table(
        headers,
        [
            [args.label, f"{r['config']} ({r['resolved']})", r["batch"], r["step_ms"], r.get("linear", 0.0), r.get("attention", 0.0), r.get("sampling", 0.0), r["other"], r["tok_per_s"], r["ttft_s"]]
            for r in rows
        ],
    )
    print(table)
    name = "step_profile" + (f"_{args.label}" if args.label else "")
    save_json(name, {"rows": rows, "args": vars(args)})
    bar_plot(
        name,
        "decode step time by category (ms)",
        [f"{r['config']} b{r['batch']}" for r in rows],
        {k: [r.get(k, 0.0) for r in rows] for k in ("linear", "attention", "sampling", "other")},
        "ms per step",
    )
    if not args.no_record:
        record(
            f"Step profile{' (' + args.label + ')' if args.label else ''}",
            f"Bundled model unless `--model` says otherwise; {args.threads} torch threads; "
            f"decode steps timed after the batch's prompts are prefilled (chat prompts of ~40 "
            f"tokens); categories in ms per step (timers add a little overhead, `step ms` is "
            f"untimed); TTFT of a {args.ttft_tokens}-token prompt with no cache hit.\n\n{table}\n\n"
            f"JSON: `benchmarks/results/{name}.json`; plot: `benchmarks/results/{name}.png`.",
        )


if __name__ == "__main__":
    main()
