"""``llm-serve``: the command line. Subcommands: ``serve``, ``chat`` and ``bench``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .engine_args import add_engine_args, engine_config_from_args
from .state import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_REQUEST_BYTES,
)
from .tool_parsers import TOOL_CALL_PARSERS

__all__ = ["build_parser", "main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 1024
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_LOG_STATS_INTERVAL = 5.0

_MODEL_HELP = (
    "'default' (the bundled SmolLM2-135M-Instruct), a model directory, a .gguf file, a Hugging "
    "Face Hub id already in the local cache (see --revision), or 'dummy:<preset|config.json>' "
    "(random weights) [default: default]"
)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=_MODEL_HELP)
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as MODEL")


def _model(args: argparse.Namespace) -> str | None:
    """MODEL, given as the positional argument or as ``--model`` (``vllm serve`` style)."""
    if args.model and args.model_option and args.model != args.model_option:
        raise ValueError(f"MODEL is given twice: {args.model!r} and --model {args.model_option!r}")
    return args.model or args.model_option  # type: ignore[no-any-return]


def _at_least(kind: Callable[[str], float], low: float, strict: bool = False) -> Any:
    """An argparse type: ``kind(text)``, which must be >= ``low`` (> when ``strict``)."""

    def parse(text: str) -> float:
        value = kind(text)
        if not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low}, got {value}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse's error names the type
    return parse


_positive_int = _at_least(int, 1)
_positive_float = _at_least(float, 0, strict=True)
_non_negative_int = _at_least(int, 0)
_non_negative_float = _at_least(float, 0)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics, /v1/cache/stats, "
        "/v1/cache/reset).",
    )
    _add_model(p)
    srv = p.add_argument_group("server")
    srv.add_argument(
        "--host", default=DEFAULT_HOST, help="address to listen on [default: 127.0.0.1]"
    )
    srv.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on [default: 8000]"
    )
    srv.add_argument(
        "--served-model-name",
        default=None,
        help="model id clients send and /v1/models lists (default: derived from MODEL)",
    )
    srv.add_argument(
        "--max-queue",
        type=_positive_int,
        default=DEFAULT_MAX_QUEUE,
        help="most requests waiting to run; beyond it requests are answered 429 [default: 1024]",
    )
    srv.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="seconds a request may take before it is aborted (504) [default: 600]",
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=_non_negative_float,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        help="on SIGINT/SIGTERM, seconds in-flight requests may finish before they are aborted [default: 30]",
    )
    srv.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health; repeat for "
        "several keys (each key is its own prefix-cache namespace). Keys are also read from "
        "the LLM_SERVE_API_KEYS environment variable (comma-separated), which keeps them out "
        "of the process list [default: no keys, open server]",
    )
    srv.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest request body accepted; larger ones are answered 413 "
        f"[default: {DEFAULT_MAX_REQUEST_BYTES}]",
    )
    srv.add_argument(
        "--admin-api-key",
        default=None,
        metavar="KEY",
        help="a key that may also read /metrics and the engine-wide /v1/cache/stats (other "
        "keys see only their own cache figures); implies API keys. Also read from "
        "LLM_SERVE_ADMIN_API_KEY [default: none]",
    )
    srv.add_argument(
        "--max-queue-per-key",
        type=_positive_int,
        default=None,
        help="most requests one API key may have waiting (without keys: all clients "
        "together); beyond it that key gets 429 [default: no per-key limit]",
    )
    srv.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="most open connections and requests in progress; beyond it requests are "
        f"answered 503 at once [default: {DEFAULT_MAX_CONNECTIONS}]",
    )
    srv.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=DEFAULT_HEADER_TIMEOUT,
        help="seconds a connection may take to send a request's headers before it is closed "
        f"[default: {DEFAULT_HEADER_TIMEOUT:g}]",
    )
    srv.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=DEFAULT_BODY_TIMEOUT,
        help="seconds a request body may take to arrive before it is answered 408 "
        f"[default: {DEFAULT_BODY_TIMEOUT:g}]",
    )
    srv.add_argument(
        "--cap-max-tokens",
        action="store_true",
        help="when max_tokens does not fit in the context after the prompt, generate up to "
        "the context's end (finish_reason 'length') instead of answering 400 "
        "context_length_exceeded [default: off]",
    )
    srv.add_argument(
        "--log-stats-interval",
        type=_non_negative_float,
        default=DEFAULT_LOG_STATS_INTERVAL,
        help="seconds between log lines with throughput, running/waiting requests, KV usage "
        "and prefix-cache hit rate, written while busy; 0 turns them off [default: 5]",
    )
    srv.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level; debug also logs every request [default: info]",
    )
    scale = p.add_argument_group("scale-out (needs the llm-serve[ray] extra)")
    scale.add_argument(
        "--replicas",
        type=_positive_int,
        default=1,
        help="engine replicas behind this one endpoint, on Ray Serve; each prompt goes to the "
        "replica whose prefix cache holds most of it (see the README). Every engine flag "
        "applies to every replica [default: 1, a single engine in this process]",
    )
    scale.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join the Ray cluster at ADDR instead of starting a local one on 127.0.0.1 "
        "(with --replicas >= 2)",
    )
    srv.add_argument(
        "--tool-call-parser",
        default=None,
        choices=list(TOOL_CALL_PARSERS),
        help="how replies are parsed into tool calls: hermes (<tool_call>{...}</tool_call>, "
        "Hermes / Qwen) or llama3_json (Llama 3.1+ JSON) [default: read off the model's chat "
        "template; hermes when it has no tool support]",
    )
    add_engine_args(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .server import build_app, run_server
    from .state import ServerSettings, served_model_name
    from .tenancy import ADMIN_KEY_ENV, keys_from_env, validate_api_key

    try:
        config = engine_config_from_args(args, _model(args))
        keys = [validate_api_key(k, "--api-key") for k in args.api_key] + keys_from_env()
        admin = args.admin_api_key or os.environ.get(ADMIN_KEY_ENV) or None
        if admin is not None:
            validate_api_key(admin, "--admin-api-key")
    except (TypeError, ValueError) as exc:
        print(f"llm-serve serve: error: {exc}", file=sys.stderr)
        return 2
    if args.ray_address and args.replicas < 2:
        print("llm-serve serve: error: --ray-address needs --replicas >= 2", file=sys.stderr)
        return 2
    if args.replicas > 1:
        from .ray_serve import require_ray

        try:
            require_ray()
        except ImportError as exc:
            print(f"llm-serve serve: error: --replicas {args.replicas}: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = ServerSettings(
        model_name=args.served_model_name or served_model_name(config.model),
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        api_keys=tuple(keys),
        max_request_bytes=args.max_request_bytes,
        log_interval=args.log_stats_interval,
        max_queue_per_key=args.max_queue_per_key,
        admin_api_key=admin,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        cap_max_tokens=args.cap_max_tokens,
        tool_call_parser=args.tool_call_parser,
    )
    logging.getLogger(__name__).info(
        "API keys: %s", f"{len(settings.api_keys)} configured" if settings.api_keys else "none"
    )
    if args.replicas > 1:
        from .ray_serve.launch import serve_replicas

        return serve_replicas(
            config,
            settings,
            args.replicas,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            ray_address=args.ray_address,
        )
    app = build_app(config, settings)
    return run_server(app, host=args.host, port=args.port, log_level=args.log_level)


def _add_chat(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with MODEL in the terminal (in-process, no server): replies stream as "
        "they are generated; the conversation is kept across turns. Type /reset to clear it, "
        "/exit (or Ctrl-D) to quit; Ctrl-C stops a reply.",
    )
    _add_model(p)
    gen = p.add_argument_group("generation")
    gen.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=512,
        help="most tokens per reply (also bounded by the context length) [default: 512]",
    )
    gen.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.7,
        help="sampling temperature; 0 is greedy [default: 0.7]",
    )
    gen.add_argument(
        "--top-p",
        type=_positive_float,
        default=1.0,
        help="nucleus sampling: keep the most likely tokens up to this probability mass, in "
        "(0, 1] [default: 1.0]",
    )
    gen.add_argument("--system", default=None, help="a system prompt put first in the conversation")
    add_engine_args(p)
    p.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    from paged_engine import SamplingParams

    from .chat import ChatSession, run_chat
    from .pipeline import Pipeline

    if args.top_p > 1:
        print(f"llm-serve chat: error: --top-p must be <= 1, got {args.top_p}", file=sys.stderr)
        return 2
    try:
        config = engine_config_from_args(args, _model(args))
        gen = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p
        )
    except (TypeError, ValueError) as exc:
        print(f"llm-serve chat: error: {exc}", file=sys.stderr)
        return 2
    print(f"loading {config.model} ...", file=sys.stderr, flush=True)
    try:
        pipe = Pipeline(config)
    except Exception as exc:
        print(f"llm-serve chat: error: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with pipe:
        session = ChatSession(pipe, gen, system=args.system)
        return run_chat(session, input, write)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test an OpenAI-compatible server",
        description="Send a shared-prefix workload of streaming requests to an OpenAI-compatible "
        "server (this one or another) and report throughput, TTFT / TPOT / ITL / E2E latency "
        "(mean, p50, p99) and the server-reported share of cached prompt tokens. Lengths are "
        "in words, which approximate tokens.",
    )
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--api-key", default=None, help="sent as 'Authorization: Bearer KEY' [default: none]"
    )
    p.add_argument(
        "--model", default=None, help="model id to request [default: the first in /v1/models]"
    )
    p.add_argument(
        "--endpoint",
        choices=["completions", "chat"],
        default="completions",
        help="/v1/completions (prefix + suffix as one prompt) or /v1/chat/completions (prefix "
        "as the system message) [default: completions]",
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--num-prefixes",
        type=_positive_int,
        default=4,
        help="distinct shared prefixes; request i uses prefix i mod N [default: 4]",
    )
    w.add_argument(
        "--prefix-len",
        type=_non_negative_int,
        default=256,
        help="words per shared prefix [default: 256]",
    )
    w.add_argument(
        "--suffix-len",
        type=_non_negative_int,
        default=32,
        help="words of each request's own suffix [default: 32]",
    )
    w.add_argument(
        "--output-len", type=_positive_int, default=64, help="max_tokens per request [default: 64]"
    )
    w.add_argument(
        "--num-requests", type=_positive_int, default=64, help="requests to send [default: 64]"
    )
    w.add_argument(
        "--request-rate",
        type=_positive_float,
        default=float("inf"),
        help="mean requests per second, Poisson arrivals; 'inf' sends them all at once "
        "[default: inf]",
    )
    w.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=None,
        help="most requests in flight at once [default: no limit]",
    )
    w.add_argument(
        "--seed", type=int, default=0, help="seed of the prompts and arrivals [default: 0]"
    )
    w.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.0,
        help="sampling temperature [default: 0]",
    )
    w.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos so every request generates --output-len tokens (a vLLM-style "
        "extension; servers that lack it answer 400) [default: off]",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        help="seconds one request may take [default: 600]",
    )
    o.add_argument(
        "--save",
        default=None,
        metavar="DIR",
        help="write DIR/bench.json (summary and per-request records) and DIR/bench.png "
        "(latency distributions and throughput; needs matplotlib) [default: not saved]",
    )
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import (
        BenchConfig,
        BenchError,
        check_plotting,
        format_report,
        run_bench,
        save_results,
        summarize,
    )

    try:
        config = BenchConfig(
            url=args.url,
            api_key=args.api_key,
            model=args.model,
            endpoint=args.endpoint,
            num_prefixes=args.num_prefixes,
            prefix_len=args.prefix_len,
            suffix_len=args.suffix_len,
            output_len=args.output_len,
            num_requests=args.num_requests,
            request_rate=args.request_rate,
            max_concurrency=args.max_concurrency,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
            temperature=args.temperature,
            timeout=args.timeout,
            progress=not args.no_progress,
        )
        if args.save is not None:
            check_plotting()
        model, duration, results = run_bench(config)
    except (ValueError, BenchError) as exc:
        print(f"llm-serve bench: error: {exc}", file=sys.stderr)
        return 2
    summary = summarize(config, model, duration, results)
    print(format_report(summary), flush=True)
    if args.save is not None:
        for path in save_results(Path(args.save), summary, results):
            print(f"wrote {path}")
    return 0 if summary["completed"] else 1


def build_parser() -> argparse.ArgumentParser:
    """The ``llm-serve`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="llm-serve",
        description="Serve LLMs with prefix caching and KV quantization.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub)
    _add_chat(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llm-serve`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
