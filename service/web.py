"""The HTTP layer both apps share (service.worker_app, service.gateway_app): JSON responses,
the API-key check, the error handlers, the middleware and /metrics.

Every error leaves as an OpenAI-shaped ErrorResponse whose code is the HTTP status, its class
chosen where it was raised (service.errors). Request validation failures are InvalidRequest
(400, never a raw 422); Starlette's own routing errors (unknown route 404, wrong method 405)
take the class of their status. An exception nothing expected is logged with its traceback
and answered 500 "internal server error", its text never sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import (
    EngineFailure,
    InternalError,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    error_for_status,
    error_response,
    status_of,
)
from service.metrics import CONTENT_TYPE_LATEST, Metrics
from service.protocol import LIMIT_KEY, ErrorResponse
from service.settings import Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def json_response(model: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> Response:
    if isinstance(model, BaseModel):
        body = model.model_dump_json()
    elif isinstance(model, list) and all(isinstance(m, BaseModel) for m in model):
        body = "[" + ",".join(m.model_dump_json() for m in model) + "]"
    else:
        body = json.dumps(model, separators=(",", ":"))
    return Response(content=body, status_code=status, media_type="application/json")


def respond(result: Any) -> Response:
    """A wire response (model, list or dict) as JSON; anything else is an SSE line iterator."""
    if isinstance(result, BaseModel | list | dict):
        return json_response(result)
    return StreamingResponse(result, media_type="text/event-stream")


def error_json(error: ServiceError) -> Response:
    response = json_response(error_response(error), status_of(error))
    if isinstance(error, Overloaded):
        response.headers["retry-after"] = str(error.retry_after)
    return response


# -- API keys ---------------------------------------------------------------------------------

PUBLIC_PATHS = frozenset({"/health", "/metrics"})  # probes: no key
GENERATION_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/generate",
    "/inference/v1/generate",
)
CONTROL_PATHS = frozenset(
    {
        "/abort_request",
        "/pause_generation",
        "/continue_generation",
        "/update_weights_from_disk",
        "/flush_cache",
    }
)


def keys_match(given: str, key: str) -> bool:
    """Constant time: the digests compared have one length, whatever the keys' lengths."""
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    key_digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(given_digest, key_digest)


def client_key(request: Request) -> str:
    """Which key the caller gave (see ApiKeys): "key-N", "admin", or "anonymous"."""
    return str(getattr(request.state, "das_key", "anonymous"))


def is_admin(request: Request) -> bool:
    """Whether the caller may see and do everything (the admin key, or none configured)."""
    return bool(getattr(request.state, "das_admin", False))


class ApiKeys:
    """Bearer auth (pure ASGI), decided from the headers alone: a refused request's body is
    never read. Control paths take settings.admin_api_key where one is set (the API key is
    refused there), else the API key; every other path but the probes takes the API key or
    the admin key; the API key is --api-key or any --client-api-key. No key configured: open.
    The caller's standing is kept for the handlers (is_admin: only an admin is shown the
    gateway's worker URLs; client_key: the gateway's admission per key)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        settings = scope["app"].state.das.settings
        users: list[str | None] = [settings.api_key, *settings.client_api_keys]
        admin: str | None = settings.admin_api_key
        token = _bearer(scope)
        admitted = admin is not None and token is not None and keys_match(token, admin)
        user = next((i for i, key in enumerate(users) if key and _given(token, key)), None)
        if admin is not None and scope["path"] in CONTROL_PATHS:
            allowed = admitted
        else:
            allowed = admitted or user is not None or not any(users)
        if not allowed:
            await error_json(Unauthorized("invalid or missing API key"))(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["das_admin"] = admitted or admin is None
        # Who is asking, for admission per key: key-0 is --api-key, key-N the Nth
        # --client-api-key; never the key itself.
        state["das_key"] = "admin" if admitted else "anonymous" if user is None else f"key-{user}"
        await self.app(scope, receive, send)


class BodyLimit:
    """A body above settings.max_body_bytes is answered 413 before it is read (pure ASGI): at
    once from its Content-Length, or, for a chunked body, as soon as the bytes received pass
    the limit (a chunked body within it is buffered and replayed to the app)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int = scope["app"].state.das.settings.max_body_bytes
        length, chunked = _body_headers(scope)
        if length is not None and length > limit:
            await _too_large(limit, length)(scope, receive, send)
            return
        if not chunked:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client left
                break
            received += len(message.get("body", b""))
            if received > limit:
                await _too_large(limit, None)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        buffered = iter(messages)

        async def replay() -> Message:
            return next(buffered, None) or await receive()

        await self.app(scope, replay, send)


def _body_headers(scope: Scope) -> tuple[int | None, bool]:
    length, chunked = None, False
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    return length, chunked


def _too_large(limit: int, length: int | None) -> Response:
    size = f" ({length} bytes)" if length is not None else ""
    response = error_json(PayloadTooLarge(f"the request body{size} is above {limit} bytes"))
    response.headers["connection"] = "close"  # the unread body cannot be skipped
    return response


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _given(token: str | None, key: str) -> bool:
    return token is not None and keys_match(token, key)


def install_error_handlers(app: FastAPI) -> None:
    async def service_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ServiceError)
        if isinstance(error, InternalError | EngineFailure):  # the cause, for the log only
            log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return error_json(error)

    async def validation_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problems: dict[str, None] = {}  # in order, once each
        param = None
        for item in error.errors():
            loc = [str(part) for part in item.get("loc", ()) if _is_field(part)]
            where = ".".join(loc) or "body"
            param = param or (where if loc else None)
            problems[f"{where}: {item.get('msg', 'invalid')}"] = None
        return error_json(InvalidRequest("; ".join(problems) or "invalid request", param))

    async def http_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        message = str(error.detail) if error.detail else "error"
        return error_json(error_for_status(error.status_code)(message))

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _is_field(part: object) -> bool:
    """A part of a validation error's location that names a field or an index: not "body",
    nor the union member pydantic tried ("str", "list[constrained-int]", "function-after[...]")."""
    if isinstance(part, int):
        return True
    text = str(part)
    return text != "body" and text.isidentifier() and text not in _TYPE_TAGS


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "json"})


class UnexpectedErrors:
    """An exception no handler took becomes an OpenAI-shaped 500 with a fixed message; its
    traceback goes to the log (pure ASGI). Starlette's own last-resort handler would answer
    in plain text and raise the exception again into the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except Exception:
            if started:  # mid-response: nothing can be rendered, the server drops it
                raise
            log.exception("%s %s failed", scope.get("method"), scope["path"])
            await error_json(InternalError())(scope, receive, send)


CLIENT_CLOSED = 499


class CancelOnDisconnect:
    """A client that leaves a generation request before its answer cancels the request
    (pure ASGI): the handler's task is cancelled, so the worker aborts it in the engine and
    frees its slot, and the abandoned rollout never ends by itself (nor enters the history).
    Streams already stop this way (Starlette watches them); this covers whole answers. One
    task reads the client's messages and hands them to the app through a queue."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        messages: asyncio.Queue[Message] = asyncio.Queue()
        answered = False  # the whole answer went out: a disconnect now is the normal end

        async def send_all(message: Message) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True

        handler = asyncio.ensure_future(self.app(scope, messages.get, send_all))
        left = False

        async def watch() -> None:
            nonlocal left
            while True:
                message = await receive()
                messages.put_nowait(message)
                if message["type"] == "http.disconnect":
                    if not answered and not handler.done():
                        left = True
                        handler.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not left:  # this task was cancelled, not by the client: pass it on
                raise
            scope.setdefault("state", {})["das_client_left"] = True
        finally:
            watcher.cancel()
            handler.cancel()


class MetricsMiddleware:
    """Counts requests and errors, and times them, by endpoint and status (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, worker: str, endpoints: set[str]) -> None:
        self.app = app
        self.endpoints = endpoints
        self.worker = worker
        self.requests = metrics.requests
        self.errors = metrics.errors
        self.latency = metrics.latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.endpoints else "other"
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if scope.get("state", {}).get("das_client_left"):
                status = CLIENT_CLOSED  # the client left before its answer, as nginx counts it
            code = str(status)
            self.requests.labels(self.worker, endpoint, code).inc()
            if status >= 400:
                self.errors.labels(self.worker, endpoint, code).inc()
            self.latency.labels(self.worker, endpoint).observe(time.perf_counter() - started)


metrics_router = APIRouter()


@metrics_router.get("/metrics")
async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the errors this service really returns: a request that fails
    validation is a 400 ErrorResponse (never FastAPI's 422 HTTPValidationError); a keyed path
    may answer 401, a body 413, a generation 404 (model) and 429, any 503 (ErrorResponse)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    body = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(body.pop("$defs", {}))
    schemas["ErrorResponse"] = body
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": content}

    _fill_limits(schemas, getattr(getattr(app.state, "das", None), "settings", None))
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = error("a value out of range or of the wrong type")
            if path not in PUBLIC_PATHS:
                responses["401"] = error("a missing or wrong API key (or admin key)")
            if method == "post":
                responses["413"] = error("a body above --max-body-bytes")
            if path in GENERATION_PATHS:
                responses["404"] = error("a model this worker does not serve")
                responses["429"] = error("the worker is full: retry after Retry-After")
            responses["503"] = error("not now: loading, shutting down, paused, no worker")
    app.openapi_schema = spec
    return spec


_LIMIT_BOUND = {"integer": "maximum", "string": "maxLength", "array": "maxItems"}


def _fill_limits(node: Any, settings: Settings | None) -> None:
    """Each value the wire models mark with LIMIT_KEY gets the configured bound (a Settings
    field: the running app's, else its default) as its type's JSON schema keyword."""
    if isinstance(node, list):
        for item in node:
            _fill_limits(item, settings)
        return
    if not isinstance(node, dict):
        return
    setting = node.pop(LIMIT_KEY, None)
    if isinstance(setting, str):
        value = (
            getattr(settings, setting)
            if settings is not None
            else Settings.model_fields[setting].default
        )
        node[_LIMIT_BOUND[node["type"]]] = value
    for child in node.values():
        _fill_limits(child, settings)


def finish_app(
    app: FastAPI, metrics: Metrics, name: str, routers: tuple[APIRouter, ...]
) -> FastAPI:
    """Add the routers (and /metrics), the error handlers and the middleware."""
    routers = (*routers, metrics_router)
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    endpoints = {getattr(route, "path", "") for router in routers for route in router.routes}
    app.add_middleware(UnexpectedErrors)  # inside the metrics: its 500s are counted
    app.add_middleware(BodyLimit)  # before any body is read (and inside the key check)
    app.add_middleware(ApiKeys)  # outside the app: a refused body is never read
    app.add_middleware(CancelOnDisconnect)  # inside the metrics: a left request counts 499
    app.add_middleware(MetricsMiddleware, metrics=metrics, worker=name, endpoints=endpoints)
    app.state.metrics = metrics
    return app
