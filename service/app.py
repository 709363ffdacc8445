"""FastAPI apps: the worker app (`das serve`, `das worker`) and the gateway app (`das gateway`).

Routers are thin: parse, call serving (or the gateway), serialise. State is built in the
lifespan and reached through the Annotated dependencies below. Every error leaves as an
OpenAI-shaped ErrorResponse whose code is the HTTP status: invalid parameters and request
validation failures 400 (never a raw 422), bad or missing API key 401, unknown model or route
404, wrong method 405, worker unreachable 502, no healthy worker 503.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from drafter import DrafterConfig
from service.fake_worker import FakeWorker
from service.gateway import Gateway
from service.history_store import HistoryStore, connect_redis
from service.metrics import CONTENT_TYPE_LATEST, Metrics
from service.protocol import (
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    SGLangGenerateRequest,
    UpdateWeightsRequest,
    VLLMGenerateRequest,
)
from service.serving import APIError, Serving, error_response
from service.settings import Settings
from service.worker import Worker, WorkerError

log = logging.getLogger(__name__)

WorkerFactory = Callable[[Settings, HistoryStore, Metrics], Worker]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


@dataclass(slots=True)
class WorkerState:
    settings: Settings
    metrics: Metrics
    worker: Worker
    serving: Serving


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    metrics: Metrics
    gateway: Gateway


async def get_worker_state(request: Request) -> WorkerState:
    state: WorkerState = request.app.state.das
    return state


async def get_gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.das
    return state


async def get_serving(request: Request) -> Serving:
    state: WorkerState = request.app.state.das
    return state.serving


WorkerDep = Annotated[WorkerState, Depends(get_worker_state)]
GatewayDep = Annotated[GatewayState, Depends(get_gateway_state)]
ServingDep = Annotated[Serving, Depends(get_serving)]
SessionHeader = Annotated[str | None, Header(alias="X-Session-ID")]
RequestIdHeader = Annotated[str | None, Header(alias="X-Request-Id")]


def _json(model: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> Response:
    if isinstance(model, BaseModel):
        body = model.model_dump_json()
    elif isinstance(model, list) and all(isinstance(m, BaseModel) for m in model):
        body = "[" + ",".join(m.model_dump_json() for m in model) + "]"
    else:
        body = json.dumps(model, separators=(",", ":"))
    return Response(content=body, status_code=status, media_type="application/json")


def _respond(result: Any) -> Response:
    if isinstance(result, BaseModel | list | dict):
        return _json(result)
    return StreamingResponse(result, media_type="text/event-stream")


# -- auth, errors, metrics middleware -------------------------------------------------------


async def require_api_key(request: Request) -> None:
    """Bearer auth against settings.api_key (no key configured: open)."""
    key: str | None = request.app.state.das.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "invalid or missing API key")


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, APIError)
        return _json(error.response(), error.status)

    async def validation_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problems = []
        param = None
        for item in error.errors():
            loc = [str(part) for part in item.get("loc", ()) if part != "body"]
            where = ".".join(loc) or "body"
            param = param or (where if loc else None)
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
        return _json(error_response(400, "; ".join(problems) or "invalid request", param), 400)

    async def worker_error(_: Request, error: Exception) -> Response:
        # A request the worker cannot run (e.g. a text prompt for a model without a tokenizer).
        assert isinstance(error, WorkerError)
        return _json(error_response(400, str(error)), 400)

    async def http_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        message = str(error.detail) if error.detail else "error"
        return _json(error_response(error.status_code, message), error.status_code)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(WorkerError, worker_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


class MetricsMiddleware:
    """Counts requests and errors, and times them, by endpoint and status (pure ASGI)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, worker: str, endpoints: set[str]) -> None:
        self.app = app
        self.endpoints = endpoints
        self.worker = worker
        self.requests = metrics.requests
        self.errors = metrics.errors
        self.latency = metrics.latency

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
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
            code = str(status)
            self.requests.labels(self.worker, endpoint, code).inc()
            if status >= 400:
                self.errors.labels(self.worker, endpoint, code).inc()
            self.latency.labels(self.worker, endpoint).observe(time.perf_counter() - started)


def _finish_app(
    app: FastAPI, metrics: Metrics, name: str, routers: tuple[APIRouter, ...]
) -> FastAPI:
    for router in routers:
        app.include_router(router)
    _install_error_handlers(app)
    endpoints = {getattr(route, "path", "") for router in routers for route in router.routes}
    app.add_middleware(MetricsMiddleware, metrics=metrics, worker=name, endpoints=endpoints)
    return app


# -- the worker app -------------------------------------------------------------------------

openai_router = APIRouter(dependencies=[Depends(require_api_key)])
sglang_router = APIRouter(dependencies=[Depends(require_api_key)])
vllm_router = APIRouter(dependencies=[Depends(require_api_key)])
control_router = APIRouter(dependencies=[Depends(require_api_key)])
public_router = APIRouter()


@openai_router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    serving: ServingDep,
    session: SessionHeader = None,
    rid: RequestIdHeader = None,
) -> Response:
    return _respond(await serving.completion(body, session, rid))


@openai_router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    serving: ServingDep,
    session: SessionHeader = None,
    rid: RequestIdHeader = None,
) -> Response:
    return _respond(await serving.chat(body, session, rid))


@openai_router.get("/v1/models")
async def models(serving: ServingDep) -> Response:
    return _json(serving.models())


@sglang_router.post("/generate")
async def sglang_generate(
    body: SGLangGenerateRequest, serving: ServingDep, session: SessionHeader = None
) -> Response:
    return _respond(await serving.sglang_generate(body, session))


@vllm_router.post("/inference/v1/generate")
async def vllm_generate(
    body: VLLMGenerateRequest, serving: ServingDep, session: SessionHeader = None
) -> Response:
    return _respond(await serving.vllm_generate(body, session))


@control_router.post("/abort_request")
async def abort_request(body: AbortRequest, serving: ServingDep) -> Response:
    return _json(await serving.abort(body))


@control_router.post("/pause_generation")
async def pause_generation(serving: ServingDep) -> Response:
    return _json(await serving.pause())


@control_router.post("/continue_generation")
async def continue_generation(serving: ServingDep) -> Response:
    return _json(await serving.resume())


@control_router.post("/update_weights_from_disk")
async def update_weights_from_disk(body: UpdateWeightsRequest, serving: ServingDep) -> Response:
    return _json(await serving.update_weights(body))


@control_router.get("/get_weight_version")
async def get_weight_version(serving: ServingDep) -> Response:
    return _json(serving.weight_version())


@control_router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(serving: ServingDep) -> Response:
    return _json(await serving.flush_cache())


@control_router.get("/health_generate")
async def health_generate(serving: ServingDep) -> Response:
    return _json(await serving.health_generate())


@control_router.get("/get_server_info")
async def get_server_info(serving: ServingDep) -> Response:
    return _json(serving.server_info())


@public_router.get("/health")
async def health(serving: ServingDep) -> Response:
    return _json(serving.health())


@public_router.get("/metrics")
async def metrics_endpoint(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def build_worker(settings: Settings, store: HistoryStore, metrics: Metrics) -> Worker:
    """The worker settings.model names: "fake" is the FakeWorker, any other model runs on the
    embedded torch engine (loaded when the worker starts)."""
    if settings.model != "fake":
        from service.engine_worker import EngineWorker  # torch is imported only when needed

        return EngineWorker(settings, store, metrics)
    return FakeWorker(
        store,
        model_name=settings.model_name,
        speculation=settings.speculation,
        spec_budget=settings.spec_budget,
        step_delay_s=settings.fake_step_delay_s,
    )


def create_app(settings: Settings, worker_factory: WorkerFactory = build_worker) -> FastAPI:
    """The worker app: one worker behind the full API (`das serve` and `das worker`)."""
    metrics = Metrics()
    name = settings.worker_name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = (
            connect_redis(settings.redis_url, settings.redis_timeout_s)
            if settings.redis_url
            else None
        )
        store = HistoryStore(
            DrafterConfig(
                window=settings.history_window,
                max_rollouts_per_group=settings.history_max_rollouts_per_group,
            ),
            metrics,
            name,
            redis,
            buffer_size=settings.history_buffer_size,
            sync_interval_s=settings.history_sync_interval_s,
        )
        worker = worker_factory(settings, store, metrics)
        log.info("starting worker %s (model %s)", name, settings.model)
        await worker.start()
        app.state.das = WorkerState(settings, metrics, worker, Serving(worker, metrics, name))
        try:
            yield
        finally:
            await worker.close()

    app = FastAPI(title="DAS rollout worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    routers = (openai_router, sglang_router, vllm_router, control_router, public_router)
    return _finish_app(app, metrics, name, routers)


# -- the gateway app ------------------------------------------------------------------------

gateway_router = APIRouter(dependencies=[Depends(require_api_key)])
gateway_public = APIRouter()
GENERATION_PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/generate",
    "/inference/v1/generate",
)


async def _forward(request: Request) -> Response:
    # A plain Starlette endpoint: the hot path skips FastAPI's dependency solving.
    await require_api_key(request)
    state: GatewayState = request.app.state.das
    forwarded = await state.gateway.forward(request.url.path, await request.body(), request.headers)
    headers = {"x-das-worker": forwarded.worker}
    if forwarded.stream is not None:
        return StreamingResponse(
            forwarded.stream, forwarded.status, headers, media_type=forwarded.content_type
        )
    return Response(forwarded.body, forwarded.status, headers, media_type=forwarded.content_type)


gateway_forward = APIRouter()
for _path in GENERATION_PATHS:
    gateway_forward.add_route(_path, _forward, methods=["POST"], name=f"forward{_path}")


def _broadcaster(path: str) -> Callable[[Request, GatewayDep], Awaitable[Response]]:
    async def broadcast(request: Request, state: GatewayDep) -> Response:
        reply = await state.gateway.broadcast("POST", path, await request.body())
        if path == "/update_weights_from_disk":
            versions = [w.get("weight_version", "0") for w in reply["workers"].values()]
            reply["weight_version"] = max(versions, key=int)
        return _json(reply)

    return broadcast


for _path in (
    "/abort_request",
    "/pause_generation",
    "/continue_generation",
    "/update_weights_from_disk",
    "/flush_cache",
):
    gateway_router.add_api_route(_path, _broadcaster(_path), methods=["POST"])


@gateway_router.get("/get_weight_version")
async def gateway_weight_version(state: GatewayDep) -> Response:
    reply = await state.gateway.broadcast("GET", "/get_weight_version")
    versions = {url: w["weight_version"] for url, w in reply["workers"].items()}
    return _json({"weight_version": max(versions.values(), key=int), "workers": versions})


@gateway_router.get("/v1/models")
async def gateway_models(state: GatewayDep) -> Response:
    forwarded = await state.gateway.get("/v1/models")
    return Response(forwarded.body, forwarded.status, media_type=forwarded.content_type)


@gateway_router.get("/health_generate")
async def gateway_health_generate(state: GatewayDep) -> Response:
    forwarded = await state.gateway.get("/health_generate", "__health__")
    return Response(forwarded.body, forwarded.status, media_type=forwarded.content_type)


@gateway_router.get("/get_server_info")
async def gateway_server_info(state: GatewayDep) -> Response:
    gateway = state.gateway
    return _json(
        {
            "role": "gateway",
            "routing": {
                "policy": "consistent-hashing-bounded-load",
                "load_factor": gateway.settings.routing_load_factor,
                "vnodes": gateway.settings.routing_vnodes,
            },
            "workers": [
                {"url": w.url, "healthy": w.healthy, "inflight": w.inflight}
                for w in gateway.workers.values()
            ],
        }
    )


@gateway_public.get("/health")
async def gateway_health(state: GatewayDep) -> Response:
    workers = {url: w.healthy for url, w in state.gateway.workers.items()}
    if not any(workers.values()):
        return _json(error_response(503, "no healthy worker"), 503)
    return _json({"status": "ok", "workers": workers})


@gateway_public.get("/metrics")
async def gateway_metrics(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_gateway_app(settings: Settings) -> FastAPI:
    """The gateway app: routes to settings.worker_urls (`das gateway`)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(settings, metrics)
        await gateway.start()
        app.state.das = GatewayState(settings, metrics, gateway)
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="DAS rollout gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    return _finish_app(app, metrics, "gateway", (gateway_forward, gateway_router, gateway_public))
