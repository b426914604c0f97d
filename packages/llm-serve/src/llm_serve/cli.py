"""``llm-serve``: the command line. Subcommands: ``serve`` (more are added as subparsers)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .engine_args import add_engine_args, engine_config_from_args

__all__ = ["build_parser", "main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_QUEUE = 1024
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health).",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="'default' (the bundled SmolLM2-135M-Instruct), a model directory, a .gguf file, or "
        "'dummy:<preset|config.json>' (random weights) [default: default]",
    )
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
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level; debug also logs every request [default: info]",
    )
    add_engine_args(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from .server import build_app, run_server
    from .state import ServerSettings, served_model_name

    try:
        config = engine_config_from_args(args, args.model)
    except (TypeError, ValueError) as exc:
        print(f"llm-serve serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = ServerSettings(
        model_name=args.served_model_name or served_model_name(config.model),
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )
    app = build_app(config, settings)
    return run_server(app, host=args.host, port=args.port, log_level=args.log_level)


def build_parser() -> argparse.ArgumentParser:
    """The ``llm-serve`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="llm-serve",
        description="Serve LLMs with prefix caching and KV quantization.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llm-serve`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
