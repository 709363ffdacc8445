"""`das serve`, `das worker` and `das gateway`: argparse front ends derived from Settings.

Every Settings field is one flag (service/settings.py's Flag says which commands take it):
`das serve` and `das worker` take the process and worker flags, `das gateway` the process and
gateway ones. The flag's name, type, choices and help come from the field; a flag left out
falls back to its DAS_* environment variable, then to the field's default. A value that
Settings refuses exits 2 naming the flag and the variable.

Wire into service/cli.py with:
    add_serve_parser(subparsers); add_worker_parser(subparsers); add_gateway_parser(subparsers)
and dispatch with `args.handler(args)` (each parser sets `handler`), or call serve(argv),
worker(argv), gateway(argv) directly.
"""

from __future__ import annotations

import argparse
import logging
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.settings import Flag, Role, Settings

Handler = Callable[[argparse.Namespace], int]

# The flags of each command, by role: serve is a worker with the whole API in one process.
COMMAND_ROLES: dict[str, tuple[Role, ...]] = {
    "serve": ("process", "worker"),
    "worker": ("process", "worker"),
    "gateway": ("process", "gateway"),
}


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = _add_command(
        subparsers, "serve", "the API and one embedded worker in one process", run_worker
    )
    parser.set_defaults(standalone=True)  # no gateway in front: the app exports its metrics
    return parser


def add_worker_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = _add_command(
        subparsers, "worker", "one worker behind the HTTP API (for a gateway)", run_worker
    )
    parser.add_argument(
        "backend_args",
        nargs="*",
        metavar="-- ARG",
        help="after --: arguments for the backend's own server (--backend sglang: SGLang's; "
        "--backend vllm: vLLM engine flags)",
    )
    return parser


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    return _add_command(
        subparsers, "gateway", "route requests to workers by prompt group", run_gateway
    )


def _add_command(
    subparsers: Any, command: str, help_text: str, handler: Handler
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        command, help=help_text, description=f"{help_text[0].upper()}{help_text[1:]}."
    )
    for name, field in Settings.model_fields.items():
        if field_flag(field).role in COMMAND_ROLES[command]:
            _add_flag(parser, name, field)
    parser.set_defaults(handler=handler, command_parser=parser)
    return parser


def field_flag(field: FieldInfo) -> Flag:
    flags = [item for item in field.metadata if isinstance(item, Flag)]
    if len(flags) != 1:
        raise TypeError(f"a Settings field needs one Flag beside its type, got {flags}")
    return flags[0]


def flag_name(name: str) -> str:
    """The command-line flag of Settings field `name` (see settings.Flag)."""
    field = Settings.model_fields[name]
    flag = field_flag(field)
    if flag.name is not None:
        return flag.name
    kebab = name.replace("_", "-")
    if field.annotation is bool:
        return f"--no-{kebab}" if field.default else f"--{kebab}"
    return f"--{kebab.removesuffix('-s')}"


def _add_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    option, help_text = flag_name(name), _help(name, field)
    if field.annotation is bool:  # the flag flips the default
        parser.add_argument(
            option, dest=name, action="store_const", const=not field.default, help=help_text
        )
        return
    kind, choices, repeated = _value_type(name, field.annotation)
    metavar = field_flag(field).metavar or option.removeprefix("--").upper().replace("-", "_")
    parser.add_argument(
        option,
        dest=name,
        type=kind,
        choices=choices,
        action="append" if repeated else "store",
        metavar=None if choices else metavar,  # choices show as {a,b,...}
        help=help_text,
    )


def _value_type(name: str, annotation: Any) -> tuple[type, tuple[str, ...] | None, bool]:
    """(argparse type, choices, repeated) of a field's annotation."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str, tuple(str(arg) for arg in args), False
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = (arg for arg in args if arg is not type(None))
        return _value_type(name, inner)
    if origin is list and args in ((str,), (int,), (float,)):
        return args[0], None, True
    if annotation in (str, int, float):
        return annotation, None, False
    raise TypeError(f"Settings.{name}: no command-line flag for a {annotation}")


def _help(name: str, field: FieldInfo) -> str:
    notes = [f"env DAS_{name.upper()}"]
    if field.annotation is not bool and field.default not in (None, PydanticUndefined):
        notes.insert(0, f"default {field.default}")
    text = f"{field.description or name} ({'; '.join(notes)})"
    return text.replace("%", "%%")  # argparse %-formats help


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags: each flag given wins over its DAS_* variable."""
    overrides = {
        name: value
        for name in Settings.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    return Settings(**overrides)


def _settings(args: argparse.Namespace) -> Settings:
    """settings_from(args), exiting 2 with one line per value that Settings refuses."""
    try:
        return settings_from(args)
    except ValidationError as error:
        parser: argparse.ArgumentParser = args.command_parser
        parser.error("; ".join(_problem(problem) for problem in error.errors()))


def _problem(problem: Any) -> str:
    message = str(problem["msg"]).removeprefix("Value error, ")
    loc = problem["loc"]
    name = str(loc[0]) if loc else ""
    if name not in Settings.model_fields:
        return message
    return f"argument {flag_name(name)} (or DAS_{name.upper()}): {message}"


def run_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)  # bad flags exit before the app's imports
    parser: argparse.ArgumentParser = args.command_parser
    backend_args: list[str] = getattr(args, "backend_args", None) or []
    if settings.backend == "sglang":
        if not hasattr(args, "backend_args"):
            parser.error("--backend sglang runs SGLang's own server: use `das worker`")
        from service.sglang_plugin.launch import run_sglang_worker

        try:
            return run_sglang_worker(settings, backend_args)
        except ValueError as error:
            parser.error(str(error))
    if backend_args and settings.backend != "vllm":
        parser.error(f"unrecognized arguments: {' '.join(backend_args)}")
    from service.worker_app import create_app

    if settings.backend == "vllm" and backend_args:  # vLLM engine flags for its AsyncLLM
        from service.vllm_backend.worker import worker_factory

        _serve(create_app(settings, worker_factory(backend_args)), settings)
        return 0
    _serve(create_app(settings, standalone=getattr(args, "standalone", False)), settings)
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from service.gateway_app import create_gateway_app

    if not settings.worker_urls and not settings.sglang_worker_urls:
        raise SystemExit(
            "das gateway: give at least one --worker or --sglang-worker URL "
            "(or DAS_WORKER_URLS, DAS_SGLANG_WORKER_URLS)"
        )
    from service.gateway import check_keys

    try:
        check_keys(settings)
    except ValueError as error:
        raise SystemExit(f"das gateway: {error}") from None
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
