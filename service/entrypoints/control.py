"""The control endpoints (SGLang's names, which slime and verl call): abort, pause and
continue, weight updates and versions, KV cache flush, health, server info; and OpenAI's
GET /v1/models. Pausing holds running requests between steps and queues new ones (SGLang's
in-place pause) until /continue_generation; /health_generate answers 503 meanwhile."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from service.entrypoints.deps import GenerationDep
from service.entrypoints.generation import Generation
from service.errors import EngineFailure, InvalidRequest, Unavailable
from service.protocol import (
    AbortRequest,
    ControlResponse,
    ModelCard,
    ModelList,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightVersionResponse,
)
from service.web import json_response
from service.worker import (
    GenerateRequest,
    SamplingParams,
    SetsWeightVersion,
    check_version_forward,
)

log = logging.getLogger(__name__)


def models(generation: Generation) -> ModelList:
    name = generation.model_name
    return ModelList(data=[ModelCard(id=name, root=name)])


async def abort(generation: Generation, request: AbortRequest) -> ControlResponse:
    if not request.abort_all and not request.rid:
        raise InvalidRequest("give rid or abort_all", "rid")
    count = await generation.abort(None if request.abort_all else request.rid)
    return ControlResponse(message=f"aborted {count} requests")


async def update_weights(
    generation: Generation, request: UpdateWeightsRequest
) -> UpdateWeightsResponse:
    """Load new weights: as the policy version given (SGLang's weight_version: how a worker
    that missed updates is brought to the deployment's version), else the worker's next."""
    worker = generation.worker
    target = request.weight_version
    setter = worker if isinstance(worker, SetsWeightVersion) else None
    if target is not None:  # refused before anything is aborted
        if setter is None:
            raise InvalidRequest("this backend cannot set weight_version", "weight_version")
        check_version_forward(target, worker.weight_version)
    if request.abort_all_requests:
        await worker.abort(None)
    if target is None or setter is None:
        version = await worker.update_weights(request.model_path)
    else:
        version = await setter.update_weights_to(request.model_path, target)
    return UpdateWeightsResponse(
        success=True, message=f"loaded {request.model_path}", weight_version=str(version)
    )


async def health_generate(generation: Generation) -> dict[str, Any]:
    """One token generated end to end, or 503."""
    worker = generation.worker
    if worker.paused:
        raise Unavailable("generation is paused")
    request = GenerateRequest(
        f"health-{uuid.uuid4().hex}", [1], SamplingParams(max_tokens=1), group="__health__"
    )
    try:
        await worker.generate(request)
    except (InvalidRequest, EngineFailure) as error:  # not the caller's doing: unhealthy
        log.warning("health generation failed", exc_info=error)
        raise Unavailable("generation failed") from error
    return {"status": "ok"}


def server_info(generation: Generation) -> dict[str, Any]:
    info = dict(generation.worker.server_info())
    info["worker"] = generation.name
    return info


router = APIRouter()  # API keys: service.web.ApiKeys
public = APIRouter()  # no API key: probes


@router.get("/v1/models")
async def list_models(generation: GenerationDep) -> Response:
    return json_response(models(generation))


@router.post("/abort_request")
async def abort_request(body: AbortRequest, generation: GenerationDep) -> Response:
    return json_response(await abort(generation, body))


@router.post("/pause_generation")
async def pause_generation(generation: GenerationDep) -> Response:
    await generation.worker.pause()
    return json_response(ControlResponse(message="paused"))


@router.post("/continue_generation")
async def continue_generation(generation: GenerationDep) -> Response:
    await generation.worker.resume()
    return json_response(ControlResponse(message="resumed"))


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(
    body: UpdateWeightsRequest, generation: GenerationDep
) -> Response:
    return json_response(await update_weights(generation, body))


@router.get("/get_weight_version")
async def get_weight_version(generation: GenerationDep) -> Response:
    version = str(generation.worker.weight_version)
    return json_response(WeightVersionResponse(weight_version=version))


async def flush_cache(generation: GenerationDep) -> Response:
    await generation.worker.flush_cache()  # KV caches only: the rollout history is kept
    return json_response(ControlResponse(message="KV cache flushed (rollout history kept)"))


# GET and POST, as SGLang serves it; one route per method, so that each has its own OpenAPI
# operation id (one route of both methods gives both the same one).
for _method in ("GET", "POST"):
    router.add_api_route(
        "/flush_cache",
        flush_cache,
        methods=[_method],
        operation_id=f"flush_cache_{_method.lower()}",
    )


@router.get("/health_generate")
async def get_health_generate(generation: GenerationDep) -> Response:
    return json_response(await health_generate(generation))


@router.get("/get_server_info")
async def get_server_info(generation: GenerationDep) -> Response:
    return json_response(server_info(generation))


@public.get("/health")
async def health(generation: GenerationDep) -> Response:
    return json_response(generation.worker.health())
