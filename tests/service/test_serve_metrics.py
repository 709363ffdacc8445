"""`das serve` is the whole service in one process: its /metrics carries the gateway's view of
its one worker (das_gateway_worker_up), which `das worker` leaves to the gateway in front of it
(else Prometheus would count a worker behind a gateway twice)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import commands
from tests.service.conftest import free_port, start_server


def served_app(monkeypatch: pytest.MonkeyPatch, command: str, argv: list[str]) -> Any:
    """The app `das COMMAND ARGV` would serve (uvicorn is not started)."""
    built: list[Any] = []
    monkeypatch.setattr(commands, "_serve", lambda app, settings: built.append(app))
    assert getattr(commands, command)(argv) == 0
    (app,) = built
    return app


def worker_up(app: Any, port: int) -> dict[str, float]:
    server = start_server(app, port)
    try:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "das_gateway_worker_up"
        for sample in family.samples
    }


def test_das_serve_exports_its_worker_as_up(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    app = served_app(monkeypatch, "serve", ["--model", "fake", "--port", str(port)])
    assert worker_up(app, port) == {f"127.0.0.1:{port}": 1.0}


def test_das_worker_leaves_it_to_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    argv = ["--model", "fake", "--port", str(port), "--worker-id", "w0"]
    app = served_app(monkeypatch, "worker", argv)
    assert worker_up(app, port) == {}
