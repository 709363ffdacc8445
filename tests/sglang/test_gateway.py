"""The gateway in front of an SGLang worker: the group id as custom_params, group affinity,
and our control calls mapped onto SGLang's. The SGLang side is a test double that answers as
SGLang 0.5.23's http_server.py does on these paths (and records what it was sent); one of our
FakeWorker apps stands beside it."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.gateway_app import create_gateway_app
from service.settings import Settings
from service.sglang_plugin.upstream import generation_body, version_order
from service.worker_app import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Served:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "did not start"
            time.sleep(0.01)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def fake_sglang() -> tuple[FastAPI, list[tuple[str, Any]]]:
    """SGLang's answers on the paths the gateway uses; `seen` records (path, JSON body)."""
    app = FastAPI()
    seen: list[tuple[str, Any]] = []
    state = {"version": "default"}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.post("/v1/completions")
    @app.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        seen.append((request.url.path, await request.json()))
        return JSONResponse({"text": "ok"})

    @app.post("/pause_generation")
    async def pause(body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008
        seen.append(("/pause_generation", body))
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    @app.post("/continue_generation")
    async def resume(body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008
        seen.append(("/continue_generation", body))
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @app.post("/abort_request")
    async def abort(body: dict[str, Any] = Body(...)) -> Response:  # noqa: B008
        seen.append(("/abort_request", body))
        return Response(status_code=200)  # SGLang answers with no body

    @app.post("/update_weights_from_disk")
    async def update(body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008
        seen.append(("/update_weights_from_disk", body))
        state["version"] = body.get("weight_version") or state["version"]
        return JSONResponse({"success": True, "message": "ok", "num_paused_requests": 0})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush() -> PlainTextResponse:
        seen.append(("/flush_cache", None))
        return PlainTextResponse("Cache flushed.\n")

    @app.get("/model_info")
    async def model_info() -> JSONResponse:
        return JSONResponse({"model_path": "/m", "weight_version": state["version"]})

    @app.post("/test/restart")  # not SGLang's: the test's way to restart it at its start-up
    async def restart() -> Response:
        state["version"] = "default"
        return Response(status_code=200)

    return app, seen


@pytest.fixture
def sglang() -> Iterator[tuple[Served, list[tuple[str, Any]]]]:
    app, seen = fake_sglang()
    served = Served(app)
    yield served, seen
    served.stop()


@pytest.fixture
def ours() -> Iterator[Served]:
    served = Served(create_app(Settings(**{"model": "fake", "port": 0, "worker_id": "ours"})))
    yield served
    served.stop()


def gateway(workers: list[str], sglang_workers: list[str], **overrides: Any) -> Served:
    settings = Settings(worker_urls=workers, sglang_worker_urls=sglang_workers, port=0, **overrides)
    return Served(create_gateway_app(settings))


def test_the_group_goes_to_sglang_as_custom_params(sglang: Any) -> None:
    server, seen = sglang
    front = gateway([], [server.url])
    try:
        with httpx.Client(base_url=front.url, timeout=10) as http:
            body = {"prompt": "hi", "prompt_group": "g1", "custom_params": {"k": 1}}
            assert http.post("/v1/completions", json=body).status_code == 200
            http.post("/generate", json={"text": "hi"}, headers={"x-session-id": "s9"})
            http.post("/v1/completions", json={"prompt": "no group"})
    finally:
        front.stop()
    assert seen == [
        ("/v1/completions", {"prompt": "hi", "custom_params": {"k": 1, "prompt_group": "g1"}}),
        ("/generate", {"text": "hi", "sampling_params": {"custom_params": {"prompt_group": "s9"}}}),
        ("/v1/completions", {"prompt": "no group"}),  # the plugin hashes the prompt ids
    ]


def test_a_group_sticks_to_one_worker_of_a_mixed_fleet(sglang: Any, ours: Served) -> None:
    server, _ = sglang
    front = gateway([ours.url], [server.url])
    try:
        with httpx.Client(base_url=front.url, timeout=10) as http:
            for group in ("a", "b", "c", "d"):
                chosen = {
                    http.post(
                        "/v1/completions",
                        json={"prompt": "x", "prompt_group": group, "max_tokens": 1},
                    ).headers["x-das-worker"]
                    for _ in range(3)
                }
                assert len(chosen) == 1
    finally:
        front.stop()


def test_control_calls_map_onto_sglangs(sglang: Any, ours: Served) -> None:
    server, seen = sglang
    front = gateway([ours.url], [server.url])
    try:
        with httpx.Client(base_url=front.url, timeout=10) as http:
            assert http.post("/pause_generation").status_code == 200
            assert http.post("/continue_generation").status_code == 200
            abort = http.post("/abort_request", json={"abort_all": True})
            assert abort.status_code == 200
            assert abort.json()["workers"][server.url] == {"success": True}
            assert http.post("/flush_cache").status_code == 200
            versions = http.get("/get_weight_version").json()
            assert versions["workers"][server.url] == "0"  # SGLang's "default": version 0
            assert versions["weight_version"] == "0" and versions["skew"] == []
            update = http.post(
                "/update_weights_from_disk", json={"model_path": "/m", "weight_version": "7"}
            ).json()
            assert update["workers"][server.url]["weight_version"] == "7"
    finally:
        front.stop()
    assert [path for path, _ in seen] == [
        "/pause_generation",
        "/continue_generation",
        "/abort_request",
        "/flush_cache",
        "/update_weights_from_disk",
    ]
    assert seen[0][1] == {"mode": "in_place"}  # ours pauses in place; SGLang's default aborts
    assert seen[1][1] == {}


def test_sglang_workers_are_versioned_held_out_and_caught_up(sglang: Any, ours: Served) -> None:
    """SGLang moves its weight version only when an update names one: the gateway names the
    next version in every update it sends an SGLang worker, reads the version from /model_info
    after each health check, holds out one that came back at its start-up version, and
    catches it up with the last update (the version as SGLang takes it, a string)."""
    server, seen = sglang
    front = gateway([ours.url], [server.url], health_interval_s=0.1)
    try:
        with httpx.Client(base_url=front.url, timeout=10) as http:
            update = http.post("/update_weights_from_disk", json={"model_path": "/m"})
            assert update.status_code == 200, update.text
            assert seen[-1] == (
                "/update_weights_from_disk",
                {"model_path": "/m", "weight_version": "1"},
            )
            versions = http.get("/get_weight_version").json()
            assert versions == {
                "weight_version": "1", "workers": {ours.url: "1", server.url: "1"}, "skew": []
            }  # fmt: skip
            assert httpx.post(server.url + "/test/restart").status_code == 200  # back at 0
            deadline = time.monotonic() + 10
            while len([p for p, _ in seen if p == "/update_weights_from_disk"]) < 2:
                assert time.monotonic() < deadline, "never caught up"
                time.sleep(0.05)
            assert seen[-1] == (
                "/update_weights_from_disk",
                {"model_path": "/m", "weight_version": "1"},
            )
            while http.get("/get_server_info").json()["skew"]:
                assert time.monotonic() < deadline, "still held out"
                time.sleep(0.05)
            # Both serve again, on version 1. The ring hashes the workers' URLs (free ports), so
            # which groups land on the SGLang worker changes from run to run: send groups until
            # one does (each has about even odds; 64 all missing it is a 2**-64 event).
            served: set[str] = set()
            for i in range(64):
                body = {"prompt": "x", "prompt_group": f"g{i}"}
                answer = http.post("/v1/completions", json=body)
                assert answer.status_code == 200, answer.text
                served.add(answer.headers["x-das-worker"])
                if len(served) == 2:
                    break
            assert served == {ours.url, server.url}
    finally:
        front.stop()
    assert any(path == "/v1/completions" for path, _ in seen)


def test_body_translation_and_version_order_directly() -> None:
    assert json.loads(generation_body("/generate", {"sampling_params": None}, "g")) == {
        "sampling_params": {"custom_params": {"prompt_group": "g"}}
    }
    batched = {"text": ["a", "b"], "sampling_params": [{"temperature": 0}, {}]}
    assert json.loads(generation_body("/generate", batched, "g"))["sampling_params"] == [
        {"temperature": 0, "custom_params": {"prompt_group": "g"}},
        {"custom_params": {"prompt_group": "g"}},
    ]
    chat = {"messages": [], "prompt_group": "g", "custom_params": None}
    assert json.loads(generation_body("/v1/chat/completions", chat, "g")) == {
        "messages": [],
        "custom_params": {"prompt_group": "g"},
    }
    assert sorted(["default", "10", "9", ""], key=version_order) == ["", "default", "9", "10"]
