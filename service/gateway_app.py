"""The gateway app (`das gateway`): generation calls forwarded to one worker (service.gateway
routes them), control calls broadcast to every worker, and the gateway's own health, info
and metrics. A worker's status and error body come back unchanged; the gateway's own errors
are those of service.errors (no healthy worker 503, worker unreachable 502, timeout 504).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from service.errors import Unavailable
from service.gateway import BROADCAST_PATHS, Gateway
from service.metrics import Metrics
from service.settings import Settings
from service.sglang_plugin.upstream import version_order
from service.web import GENERATION_PATHS, client_key, finish_app, is_admin, json_response


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    metrics: Metrics
    gateway: Gateway


async def get_gateway(request: Request) -> Gateway:
    state: GatewayState = request.app.state.das
    return state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def _forward(request: Request) -> Response:
    # A plain Starlette endpoint: the hot path skips FastAPI's dependency solving.
    state: GatewayState = request.app.state.das
    forwarded = await state.gateway.forward(
        request.url.path, await request.body(), request.headers, client_key(request)
    )
    headers = {"x-das-worker": _shown(request, state.gateway, forwarded.worker)}
    if forwarded.retry_after is not None:
        headers["retry-after"] = forwarded.retry_after
    if forwarded.stream is not None:
        return StreamingResponse(
            forwarded.stream, forwarded.status, headers, media_type=forwarded.content_type
        )
    return Response(forwarded.body, forwarded.status, headers, media_type=forwarded.content_type)


def _shown(request: Request, gateway: Gateway, url: str) -> str:
    """A worker as this caller may see it: its URL to an admin, else its name."""
    return url if is_admin(request) else gateway.worker_name(url)


forward_router = APIRouter()
for _path in GENERATION_PATHS:
    forward_router.add_route(_path, _forward, methods=["POST"], name=f"forward{_path}")


def _broadcaster(path: str) -> Callable[[Request, GatewayDep], Awaitable[Response]]:
    async def broadcast(request: Request, gateway: GatewayDep) -> Response:
        reply = await gateway.broadcast("POST", path, await request.body())
        if path == "/update_weights_from_disk":
            versions = [w.get("weight_version", "0") for w in reply["workers"].values()]
            reply["weight_version"] = max(versions, key=version_order)
        reply["workers"] = {_shown(request, gateway, u): w for u, w in reply["workers"].items()}
        return json_response(reply)

    return broadcast


router = APIRouter()  # API keys: service.web.ApiKeys
for _path in BROADCAST_PATHS:
    router.add_api_route(_path, _broadcaster(_path), methods=["POST"])


@router.get("/get_weight_version")
async def weight_version(request: Request, gateway: GatewayDep) -> Response:
    reply = await gateway.broadcast("GET", "/get_weight_version")
    workers = reply["workers"].items()
    versions = {_shown(request, gateway, u): w["weight_version"] for u, w in workers}
    latest = gateway.announced or max(versions.values(), key=version_order)
    # skew: the workers on another version, held out of routing until they are on this one
    return json_response({"weight_version": latest, "workers": versions, "skew": gateway.skew()})


@router.get("/v1/models")
async def models(gateway: GatewayDep) -> Response:
    forwarded = await gateway.get("/v1/models")
    return Response(forwarded.body, forwarded.status, media_type=forwarded.content_type)


@router.get("/health_generate")
async def health_generate(gateway: GatewayDep) -> Response:
    forwarded = await gateway.get("/health_generate", "__health__")
    return Response(forwarded.body, forwarded.status, media_type=forwarded.content_type)


@router.get("/get_server_info")
async def server_info(request: Request, gateway: GatewayDep) -> Response:
    workers = [(_shown(request, gateway, w.url), w) for w in gateway.workers.values()]
    routable = set(gateway.routable())
    return json_response(
        {
            "role": "gateway",
            "routing": {
                "policy": "consistent-hashing-bounded-load",
                "load_factor": gateway.settings.routing_load_factor,
                "vnodes": gateway.settings.routing_vnodes,
            },
            "workers": [
                {
                    "url": url,
                    "healthy": w.healthy,
                    "inflight": w.inflight,
                    "weight_version": w.version,
                    "routable": w.url in routable,
                    "catch_up_failures": w.catch_up_failures,  # in a row, to the announced
                }
                for url, w in workers
            ],
            "weight_version": gateway.announced,
            "skew": gateway.skew(),
        }
    )


public = APIRouter()  # no API key: probes


@public.get("/health")
async def health(gateway: GatewayDep) -> Response:
    workers = {gateway.worker_name(url): w.healthy for url, w in gateway.workers.items()}
    if not any(workers.values()):
        raise Unavailable("no healthy worker")
    return json_response({"status": "ok", "workers": workers})


def create_gateway_app(settings: Settings) -> FastAPI:
    """Routes to settings.worker_urls."""
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
    return finish_app(app, metrics, "gateway", (forward_router, router, public))
