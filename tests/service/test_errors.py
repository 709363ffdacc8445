"""Typed errors end to end: each class's status and OpenAI-shaped body through a real app
(httpx over ASGI, the app's lifespan run), engine failures that leak nothing, mid-stream
failures as SSE error events, and the embedded engine's own failure and shutdown paths."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.errors import (
    ERRORS,
    EngineFailure,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unauthorized,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
    error_for_status,
    error_response,
    status_of,
)
from service.fake_worker import FakeWorker
from service.history_store import HistoryStore
from service.metrics import Metrics
from service.settings import Settings
from service.worker import GenerateRequest, SampleDelta
from service.worker_app import create_app
from tests.service.conftest import worker_settings

SECRET = "CUDA out of memory: secret detail"
COMPLETION = {"prompt": "x", "max_tokens": 8, "seed": 1}
# Every generation dialect, whole and streamed (vLLM's endpoint does not stream).
DIALECTS = [
    ("/v1/completions", COMPLETION),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8}),
    ("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8}}),
]


class FailingWorker(FakeWorker):
    """A FakeWorker whose every request fails with failure() after `after` deltas."""

    def __init__(
        self, store: HistoryStore, failure: Callable[[], BaseException], after: int = 0
    ) -> None:
        super().__init__(store, speculation=False)  # one token per delta
        self.failure = failure
        self.after = after

    async def stream(self, request: GenerateRequest) -> AsyncIterator[SampleDelta]:
        sent = 0
        async with contextlib.aclosing(super().stream(request)) as deltas:
            async for delta in deltas:
                if sent == self.after:
                    raise self.failure()
                yield delta
                sent += 1


def failing_app(failure: Callable[[], BaseException], after: int = 0) -> FastAPI:
    def factory(_: Settings, store: HistoryStore, __: Metrics) -> FailingWorker:
        return FailingWorker(store, failure, after)

    return create_app(worker_settings(worker_id="failing"), factory)


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)  # raises what the app lets escape
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def post(app: FastAPI, path: str, body: dict[str, Any]) -> httpx.Response:
    async def main() -> httpx.Response:
        async with running(app) as client:
            return await client.post(path, json=body)

    return asyncio.run(main())


def sse_events(response: httpx.Response) -> list[Any]:
    lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def raised(
    error: Callable[[], BaseException], cause: Callable[[], BaseException]
) -> Callable[[], BaseException]:
    """A new error with a new cause at every call: an instance raised once holds the frames it
    passed through (a worker, its history) for as long as the parametrization keeps it."""

    def make() -> BaseException:
        made = error()
        made.__cause__ = cause()
        return made

    return make


# The spec: class -> (status, OpenAI error type).
TABLE = {
    InvalidRequest: (400, "invalid_request_error"),
    Unauthorized: (401, "authentication_error"),
    NotFound: (404, "not_found_error"),
    MethodNotAllowed: (405, "invalid_request_error"),
    PayloadTooLarge: (413, "invalid_request_error"),
    Overloaded: (429, "rate_limit_error"),
    InternalError: (500, "internal_error"),
    EngineFailure: (500, "internal_error"),
    UpstreamError: (502, "upstream_error"),
    Unavailable: (503, "service_unavailable"),
    UpstreamTimeout: (504, "upstream_timeout"),
}


def make(kind: type[ServiceError]) -> ServiceError:
    if kind in (InternalError, EngineFailure):
        return kind()  # type: ignore[call-arg]
    return kind("it went wrong", "some_field")


def test_the_table() -> None:
    assert ERRORS == TABLE
    for kind, (status, _) in TABLE.items():
        assert status_of(make(kind)) == status
        assert issubclass(error_for_status(status), ServiceError)
        assert status_of(make(error_for_status(status))) == status
    assert error_for_status(500) is InternalError
    assert error_for_status(418) is InvalidRequest and error_for_status(599) is UpstreamError
    assert InternalError().message == "internal server error"
    assert EngineFailure().message == "generation failed"


@pytest.mark.parametrize("kind", list(TABLE))
def test_each_class_renders_its_status_and_openai_body(kind: type[ServiceError]) -> None:
    status, type_ = TABLE[kind]
    error = make(kind)
    response = post(failing_app(lambda: make(kind)), "/v1/completions", COMPLETION)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {"message": error.message, "type": type_, "param": error.param, "code": status}
    }
    assert error_response(error).model_dump() == response.json()


@pytest.mark.parametrize(
    "failure",
    [lambda: RuntimeError(SECRET), raised(EngineFailure, lambda: RuntimeError(SECRET))],
    ids=["unexpected", "engine-failure"],
)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body"), DIALECTS, ids=[p for p, _ in DIALECTS])
def test_an_engine_exception_is_a_500_that_leaks_nothing(
    failure: Callable[[], BaseException],
    stream: bool,
    path: str,
    body: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR):
        response = post(failing_app(failure), path, {**body, "stream": stream})
    assert response.status_code == 500  # nothing was sent before: a real status
    error = response.json()["error"]
    assert error["code"] == 500 and error["type"] == "internal_error" and error["param"] is None
    assert error["message"] in ("internal server error", "generation failed")
    assert "secret" not in response.text and "CUDA" not in response.text
    assert SECRET in caplog.text  # the cause is logged, with its traceback
    assert "Traceback" in caplog.text


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (lambda: RuntimeError(SECRET), "internal server error"),
        (raised(EngineFailure, lambda: RuntimeError(SECRET)), "generation failed"),
        (lambda: Unavailable("the worker is shutting down"), "the worker is shutting down"),
    ],
    ids=["unexpected", "engine-failure", "unavailable"],
)
@pytest.mark.parametrize(("path", "body"), DIALECTS, ids=[p for p, _ in DIALECTS])
def test_a_failure_mid_stream_is_an_sse_error_event(
    failure: Callable[[], BaseException],
    message: str,
    path: str,
    body: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR):
        response = post(failing_app(failure, after=2), path, {**body, "stream": True})
    assert response.status_code == 200  # sent with the first event
    *chunks, last = sse_events(response)
    assert chunks and all("error" not in chunk for chunk in chunks)
    status = 503 if message.startswith("the worker") else 500
    assert last == {
        "error": {
            "message": message,
            "type": TABLE[Unavailable if status == 503 else InternalError][1],
            "param": None,
            "code": status,
        }
    }
    assert "secret" not in response.text
    if status == 500:
        assert SECRET in caplog.text


def test_shutting_down_and_not_loaded_are_503() -> None:
    for message in ("the worker is shutting down", "the model is not loaded yet"):
        response = post(failing_app(lambda m=message: Unavailable(m)), *DIALECTS[0])
        assert response.status_code == 503
        assert response.json()["error"] == {
            "message": message,
            "type": "service_unavailable",
            "param": None,
            "code": 503,
        }


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**COMPLETION, "temperature": 9}, "temperature"),
        ("/v1/chat/completions", {**DIALECTS[1][1], "top_p": 0}, "top_p"),
        (
            "/generate",
            {"input_ids": [1], "sampling_params": {"max_new_tokens": 0}},
            "sampling_params.max_new_tokens",
        ),
        ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"n": 0}},
         "sampling_params.n"),
    ],
)  # fmt: skip
def test_sampling_values_are_invalid_requests_in_every_dialect(
    path: str, body: dict[str, Any], param: str
) -> None:
    response = post(create_app(worker_settings(worker_id="plain")), path, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    # Refused at the wire model (issue 13), which names the field and its range.
    assert error["param"] == param and "should be" in error["message"]


# -- the embedded engine (tiny random model) ------------------------------------------------


@pytest.fixture
def engine_threads() -> Iterator[None]:
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: keep one free
    yield
    torch.set_num_threads(threads)


def engine_app() -> FastAPI:
    settings = Settings(
        model="tiny-random", max_model_len=256, max_batch=4, speculation=False, worker_id="engine"
    )  # one token per forward: the forward that fails is known
    return create_app(settings)


def break_forward(app: FastAPI, fail_at: int) -> None:
    """The runner's forward raises SECRET on its fail_at-th call (1-based) from now on."""
    runner = app.state.das.worker._engine.runner
    forward = runner.forward
    calls = 0

    def broken(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise RuntimeError(SECRET)
        return forward(*args, **kwargs)

    runner.forward = broken


@pytest.mark.usefixtures("engine_threads")
def test_engine_step_failure_is_a_500_and_the_worker_survives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = engine_app()
    body = {"token_ids": [3, 14, 15], "sampling_params": {"max_tokens": 6, "ignore_eos": True}}
    streamed = {"prompt": [3, 14, 15], "max_tokens": 6, "ignore_eos": True, "stream": True}

    async def main() -> tuple[httpx.Response, ...]:
        async with running(app) as client:
            break_forward(app, fail_at=1)
            failed = await client.post("/inference/v1/generate", json=body)
            break_forward(app, fail_at=3)  # the first events go out, then the step fails
            mid_stream = await client.post("/v1/completions", json=streamed)
            after = await client.post("/inference/v1/generate", json=body)
        return failed, mid_stream, after

    with caplog.at_level(logging.ERROR):
        failed, mid_stream, after = asyncio.run(main())
    assert failed.status_code == 500
    assert failed.json()["error"] == {
        "message": "generation failed",
        "type": "internal_error",
        "param": None,
        "code": 500,
    }
    assert mid_stream.status_code == 200
    *chunks, last = sse_events(mid_stream)
    assert chunks and last["error"]["message"] == "generation failed"
    assert last["error"]["code"] == 500
    assert "secret" not in failed.text + mid_stream.text
    assert SECRET in caplog.text
    assert after.status_code == 200 and len(after.json()["choices"][0]["token_ids"]) == 6


@pytest.mark.usefixtures("engine_threads")
def test_engine_shutting_down_is_a_503() -> None:
    app = engine_app()

    async def main() -> httpx.Response:
        async with running(app) as client:
            await app.state.das.worker.close()
            return await client.post("/inference/v1/generate", json={"token_ids": [1, 2]})

    response = asyncio.run(main())
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "the worker is shutting down",
        "type": "service_unavailable",
        "param": None,
        "code": 503,
    }
