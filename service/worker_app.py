"""The worker app: one worker behind the full API (`das serve`, `das worker`).

The lifespan builds the history store and the worker, starts it (the app answers once the
model is loaded) and keeps the state on app.state.das; the dialect routers
(service.entrypoints) reach it through their Annotated dependencies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.entrypoints import chat, completions, control, sglang, vllm
from service.entrypoints.deps import WorkerState
from service.entrypoints.generation import Generation
from service.fake_worker import FakeWorker
from service.history_store import HistoryStore, connect_redis
from service.limits import FAKE_MAX_MODEL_LEN, Limits
from service.metrics import Metrics
from service.settings import Settings
from service.web import finish_app
from service.worker import Worker

log = logging.getLogger(__name__)

WorkerFactory = Callable[[Settings, HistoryStore, Metrics], Worker]


def build_worker(settings: Settings, store: HistoryStore, metrics: Metrics) -> Worker:
    """The worker settings.model names: "fake" is the FakeWorker, any other model runs on the
    embedded torch engine (loaded when the worker starts)."""
    if getattr(settings, "backend", "engine") == "vllm":
        from service.vllm_backend.worker import VllmWorker  # vLLM is imported only here

        return VllmWorker(settings, store, metrics)
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


def request_limits(settings: Settings) -> Limits:
    """What one request may ask of this worker: the FakeWorker has no model to bound the
    context, any other worker the configured max_model_len."""
    context = FAKE_MAX_MODEL_LEN if settings.model == "fake" else settings.max_model_len
    return Limits(
        context,
        max_prompts=settings.max_prompts_per_request,
        max_inflight_samples=settings.max_inflight_samples,
        max_n=settings.max_n,
        max_stop=settings.max_stop_strings,
        max_stop_chars=settings.max_stop_chars,
    )


def create_app(
    settings: Settings, worker_factory: WorkerFactory = build_worker, *, standalone: bool = False
) -> FastAPI:
    """standalone: the app is the whole service (`das serve`, no gateway in front), so it
    also exports the gateway's view of its one worker (das_gateway_worker_up)."""
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
            settings.drafter_config(),
            metrics,
            name,
            redis,
            buffer_size=settings.history_buffer_size,
            sync_interval_s=settings.history_sync_interval_s,
            close_timeout_s=settings.history_close_timeout_s,
        )
        worker = worker_factory(settings, store, metrics)
        log.info("starting worker %s (model %s)", name, settings.model)
        await worker.start()
        generation = Generation(worker, metrics, name, request_limits(settings))
        if standalone:  # up as a gateway would see it: /health answers and it is not stopped
            metrics.worker_up.labels(worker=name).set_function(
                lambda: float(worker.health()["status"] != "stopped")
            )
        app.state.das = WorkerState(settings, metrics, worker, generation)
        try:
            yield
        finally:
            await worker.close()

    app = FastAPI(title="DAS rollout worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    routers = (
        completions.router,
        chat.router,
        sglang.router,
        vllm.router,
        control.router,
        control.public,
    )
    return finish_app(app, metrics, name, routers)
