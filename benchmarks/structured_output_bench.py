"""Decode step time with constrained requests vs unconstrained ones (CPU).

The same batch of requests decodes twice in one engine: once plain, once with every request
under a JSON-schema constraint (each its own matcher, one shared compiled grammar, one
bitmask per step). Both runs use ``ignore_eos`` and a schema that cannot be completed within
the token limit, so both decode the same number of tokens per step; the figure is the median
step time over the decode steps (prefill steps excluded). Target: constrained within 10%.

Full run (on a quiet machine)::

    uv run python benchmarks/structured_output_bench.py --model dummy:smollm2-135m --requests 16

Smoke run: ``--quick`` (4 requests, a few steps, one thread, nothing saved; checks the script,
not the figure).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import command_line, hardware, markdown_table, record, save_json

from paged_engine import EngineConfig, LLMEngine, SamplingParams, StructuredOutput

# A constraint that cannot finish within the token limit (the string needs 2000 characters),
# so every constrained request decodes as long as its unconstrained twin.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 9},
        "notes": {"type": "string", "minLength": 2000},
    },
    "required": ["id", "notes"],
}


def decode_step_times(
    engine: LLMEngine, n: int, max_tokens: int, constraint: StructuredOutput | None
) -> list[float]:
    for i in range(n):
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0,
            seed=i,
            ignore_eos=True,
            structured_output=constraint,
        )
        engine.add_request(f"{'c' if constraint else 'p'}{i}", f"request {i}: ", params)
    if constraint is not None:  # compile before timing (it happens off the step anyway)
        engine.grammars.submit(constraint).result()
    times: list[float] = []
    while engine.has_unfinished():
        decoding = all(
            s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running
        )
        full = len(engine.scheduler.running) == n and not engine.scheduler.waiting
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if decoding and full:
            times.append(dt)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="dummy:smollm2-135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="plain / constrained runs, alternated")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.threads, args.rounds = 4, 12, 1, 2
    torch.set_num_threads(args.threads)
    engine = LLMEngine(
        EngineConfig(model=args.model, device="cpu", num_blocks=1024, max_model_len=1024)
    )
    constraint = StructuredOutput.json_schema(SCHEMA)
    decode_step_times(engine, args.requests, 4, None)  # warm-up
    plain: list[float] = []
    constrained: list[float] = []
    for _ in range(args.rounds):  # alternate, so drift in machine load hits both alike
        plain += decode_step_times(engine, args.requests, args.max_tokens, None)
        constrained += decode_step_times(engine, args.requests, args.max_tokens, constraint)
    p, c = statistics.median(plain), statistics.median(constrained)
    overhead = c / p - 1
    rows = [
        ["unconstrained", args.requests, len(plain), p * 1e3],
        ["json_schema", args.requests, len(constrained), c * 1e3],
    ]
    table = markdown_table(["requests", "batch", "decode steps", "median step ms"], rows)
    verdict = f"constrained overhead {overhead:+.1%} (target within +10%)"
    print(table)
    print(verdict)
    if args.quick:
        return
    save_json(
        "structured_output_bench",
        {
            "model": args.model,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "median_step_s": {"unconstrained": p, "constrained": c},
            "overhead": overhead,
            "hardware": hardware(),
            "command": command_line(),
        },
    )
    if not args.no_record:
        record("Structured output: decode step time", f"{table}\n\n{verdict}")


if __name__ == "__main__":
    main()
