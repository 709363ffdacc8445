"""Fixtures for the service tests: apps under a real uvicorn on a free port, and a real
redis-server of the test's own (never the shared one on 6379)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from service.gateway_app import create_gateway_app
from service.settings import Settings
from service.worker_app import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    """An ASGI app served by uvicorn in a background thread."""

    app: Any
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def metric_values(base_url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples named `name` on base_url's /metrics: (labels, value) each."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def start_server(app: Any, port: int | None = None) -> Server:
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    return Server(app, port, server, thread)


def worker_settings(**overrides: Any) -> Settings:
    return Settings(**{"model": "fake", "port": 0, **overrides})


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    """Start worker apps: serve(**settings) -> Server; all stopped at teardown."""
    servers: list[Server] = []

    def start(**overrides: Any) -> Server:
        port = overrides.pop("port", None) or free_port()
        settings = worker_settings(port=port, worker_id=f"w{port}", **overrides)
        server = start_server(create_app(settings), port)
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def serve_gateway() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(worker_urls: list[str], **overrides: Any) -> Server:
        port = free_port()
        settings = Settings(worker_urls=worker_urls, port=port, **overrides)
        server = start_server(create_gateway_app(settings), port)
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture(scope="module")
def worker() -> Iterator[Server]:
    """One shared FakeWorker app for read-mostly tests."""
    port = free_port()
    server = start_server(create_app(worker_settings(port=port, worker_id="shared")), port)
    yield server
    server.stop()


@pytest.fixture
def client(worker: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker.url, timeout=10) as http:
        yield http


class RedisServer:
    """A redis-server on a free port in a temporary directory; stop() and start() again."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
