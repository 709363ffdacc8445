"""What the worker app's routers get from the app: its state (built in the lifespan, kept on
app.state.das) and the request headers the dialects read, as Annotated dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from service.entrypoints.generation import Generation
from service.metrics import Metrics
from service.settings import Settings
from service.worker import Worker


@dataclass(slots=True)
class WorkerState:
    settings: Settings
    metrics: Metrics
    worker: Worker
    generation: Generation


async def get_generation(request: Request) -> Generation:
    state: WorkerState = request.app.state.das
    return state.generation


GenerationDep = Annotated[Generation, Depends(get_generation)]
SessionHeader = Annotated[str | None, Header(alias="X-Session-ID")]
RequestIdHeader = Annotated[str | None, Header(alias="X-Request-Id")]
