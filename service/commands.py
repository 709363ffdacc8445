"""`das serve`, `das worker` and `das gateway`: argparse front ends over Settings.

Wire into service/cli.py with:
    add_serve_parser(subparsers); add_worker_parser(subparsers); add_gateway_parser(subparsers)
and dispatch with `args.handler(args)` (each parser sets `handler`), or call serve(argv),
worker(argv), gateway(argv) directly. A flag left out falls back to DAS_* environment variables,
then to Settings' defaults.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any

from service.settings import Settings

Handler = Callable[[argparse.Namespace], int]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--api-key", dest="api_key", default=None, help="require this Bearer key")
    parser.add_argument(
        "--log-level", dest="log_level", choices=["debug", "info", "warning", "error"], default=None
    )


def _worker_flags(parser: argparse.ArgumentParser, redis_default_help: str) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="smollm2-135m (default), tiny-random, a model directory, a .gguf file, "
        "or 'fake' for the deterministic FakeWorker",
    )
    parser.add_argument("--served-model-name", dest="served_model_name", default=None)
    parser.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default float32"
    )
    parser.add_argument("--redis-url", dest="redis_url", default=None, help=redis_default_help)
    parser.add_argument(
        "--spec-policy",
        dest="spec_policy",
        default=None,
        metavar="POLICY",
        help="speculation budget policy: das (default), fixed:K or none",
    )
    parser.add_argument(
        "--no-speculation",
        dest="speculation",
        action="store_const",
        const=False,
        default=None,
        help="no drafts (= --spec-policy none)",
    )
    parser.add_argument(
        "--spec-budget", dest="spec_budget", type=int, default=None, help="FakeWorker budget"
    )
    parser.add_argument("--max-batch", dest="max_batch", type=int, default=None)
    parser.add_argument("--max-model-len", dest="max_model_len", type=int, default=None)
    parser.add_argument(
        "--deterministic",
        action="store_const",
        const=True,
        default=None,
        help="batch-invariant engine numerics: logits bitwise independent of batch and drafts",
    )
    parser.add_argument("--worker-id", dest="worker_id", default=None)
    parser.add_argument("--fake-step-delay", dest="fake_step_delay_s", type=float, default=None)


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="the API and one embedded worker in one process"
    )
    _common(parser)
    _worker_flags(parser, "share the history through Redis (default: in process)")
    parser.set_defaults(handler=run_worker)
    return parser


def add_worker_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "worker", help="one worker behind the HTTP API (for a gateway)"
    )
    _common(parser)
    _worker_flags(parser, "the shared history service")
    parser.set_defaults(handler=run_worker)
    return parser


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", help="route requests to workers by prompt group"
    )
    _common(parser)
    parser.add_argument(
        "--worker",
        dest="worker_urls",
        action="append",
        default=None,
        metavar="URL",
        help="a worker's base URL (repeat for each worker)",
    )
    parser.add_argument("--worker-api-key", dest="worker_api_key", default=None)
    parser.add_argument("--load-factor", dest="routing_load_factor", type=float, default=None)
    parser.add_argument("--health-interval", dest="health_interval_s", type=float, default=None)
    parser.set_defaults(handler=run_gateway)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key not in ("handler", "command") and value is not None
    }
    return Settings(**overrides)


def run_worker(args: argparse.Namespace) -> int:
    from service.app import create_app

    settings = settings_from(args)
    _serve(create_app(settings), settings)
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    from service.app import create_gateway_app

    settings = settings_from(args)
    if not settings.worker_urls:
        raise SystemExit("das gateway: give at least one --worker URL (or DAS_WORKER_URLS)")
    _serve(create_gateway_app(settings), settings)
    return 0


def _serve(app: Any, settings: Settings) -> None:
    import uvicorn  # only the serving commands need it

    logging.basicConfig(level=settings.log_level.upper())
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False
    )


def _main(add: Callable[[Any], argparse.ArgumentParser], argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="das")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add(subparsers)
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


def serve(argv: Sequence[str] | None = None) -> int:
    """`das serve ...` (argv without the leading 'serve')."""
    return _main(add_serve_parser, ["serve", *(argv or [])])


def worker(argv: Sequence[str] | None = None) -> int:
    return _main(add_worker_parser, ["worker", *(argv or [])])


def gateway(argv: Sequence[str] | None = None) -> int:
    return _main(add_gateway_parser, ["gateway", *(argv or [])])
