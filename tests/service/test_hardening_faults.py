"""Issue 13, faults, with real processes: `das worker` processes stopped by SIGTERM while
their Redis (a real redis-server) is down, killed by SIGKILL mid-stream behind a gateway, and
clients that leave a non-streaming request."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.service.conftest import RedisServer, Server, free_port, metric_values


class WorkerProcess:
    """`das worker --model fake` in a process of its own."""

    def __init__(self, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--model", "fake",
             "--port", str(self.port), "--worker-id", f"p{self.port}", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start: {self.stderr()}")
            time.sleep(0.1)

    def stderr(self) -> str:
        self.process.wait(timeout=60)
        assert self.process.stderr is not None
        return self.process.stderr.read()

    def complete(self, group: str, **body: object) -> httpx.Response:
        payload = {"prompt": f"prompt {group}", "max_tokens": 8, "prompt_group": group, **body}
        return httpx.post(self.url + "/v1/completions", json=payload, timeout=30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def processes() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*flags: str, port: int | None = None) -> WorkerProcess:
        started.append(WorkerProcess(*flags, port=port))
        return started[-1]

    yield start
    for worker in started:
        worker.kill()


def shared_rollouts(redis: RedisServer) -> int:
    """Rollouts in the Redis streams (XLEN of every das:rollouts:* key), over RESP."""
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
        sock.sendall(b"KEYS das:rollouts:*\r\n")
        reply = _read(sock)
        keys = [line for line in reply.split(b"\r\n")[1:] if line and not line.startswith(b"$")]
        total = 0
        for key in keys:
            sock.sendall(b"XLEN " + key + b"\r\n")
            total += int(_read(sock)[1:].split(b"\r\n")[0])
        return total


def _read(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    while not data.endswith(b"\r\n"):
        data += sock.recv(65536)
    return data


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.05)


def busy(workers: list[WorkerProcess]) -> WorkerProcess | None:
    """The worker with a request running, if any."""
    for worker in workers:
        info = httpx.get(worker.url + "/get_server_info", timeout=5).json()
        if info["running_requests"]:
            return worker
    return None


def test_sigterm_with_redis_down_logs_and_counts_what_is_lost(
    redis_server: RedisServer, processes: Callable[..., WorkerProcess]
) -> None:
    worker = processes("--redis-url", redis_server.url, "--history-close-timeout", "0.5")
    for group in ("a", "b", "c"):
        assert worker.complete(group).status_code == 200
    wait_for(lambda: shared_rollouts(redis_server) == 3)  # Redis up: nothing is lost
    redis_server.stop()
    for group in ("d", "e"):
        assert worker.complete(group).status_code == 200
    worker.process.send_signal(signal.SIGTERM)
    stderr = worker.stderr()
    assert worker.process.returncode in (0, -signal.SIGTERM), stderr  # uvicorn re-raises it
    assert "shutdown: 2 buffered rollouts lost" in stderr


def test_sigterm_retries_the_flush_until_redis_is_back(
    redis_server: RedisServer, processes: Callable[..., WorkerProcess]
) -> None:
    worker = processes("--redis-url", redis_server.url, "--history-close-timeout", "20")
    redis_server.stop()
    for group in ("d", "e"):
        assert worker.complete(group).status_code == 200
    worker.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the worker is retrying its flush (no assertion rests on this wait)
    assert worker.process.poll() is None
    redis_server.start()  # a fresh, empty Redis on the same port
    stderr = worker.stderr()
    assert worker.process.returncode in (0, -signal.SIGTERM), stderr  # uvicorn re-raises it
    assert "lost" not in stderr
    assert shared_rollouts(redis_server) == 2


# -- a worker killed behind the gateway ---------------------------------------------------------


@pytest.fixture
def two_workers_behind_a_gateway(
    processes: Callable[..., WorkerProcess], serve_gateway: Callable[..., Server]
) -> tuple[Server, list[WorkerProcess]]:
    workers = [processes("--fake-step-delay", "0.02") for _ in range(2)]
    gateway = serve_gateway([w.url for w in workers], health_interval_s=0.2)
    return gateway, workers


LONG = {"prompt": "long", "max_tokens": 3000, "ignore_eos": True, "seed": 1}


def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_event(
    two_workers_behind_a_gateway: tuple[Server, list[WorkerProcess]],
) -> None:
    gateway, workers = two_workers_behind_a_gateway
    by_url = {w.url: w for w in workers}
    with (
        httpx.Client(base_url=gateway.url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as stream,
    ):
        assert stream.status_code == 200
        events = stream.iter_lines()
        assert next(events).startswith("data: {")  # it started
        by_url[stream.headers["x-das-worker"]].process.kill()  # SIGKILL
        rest = [line for line in events if line.startswith("data: ")]
    last = rest[-1]
    assert last != "data: [DONE]"  # not a silent truncation either
    error = json.loads(last.removeprefix("data: "))["error"]
    assert error["code"] == 502 and error["type"] == "upstream_error"
    assert "127.0.0.1" not in error["message"]


def test_a_request_not_yet_answered_is_retried_on_another_worker(
    two_workers_behind_a_gateway: tuple[Server, list[WorkerProcess]],
) -> None:
    gateway, workers = two_workers_behind_a_gateway
    outcome: dict[str, httpx.Response] = {}

    def run() -> None:
        body = {**LONG, "max_tokens": 150}  # ~3 s on the second worker (no drafts there)
        outcome["response"] = httpx.post(gateway.url + "/v1/completions", json=body, timeout=60)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: busy(workers) is not None)
        serving = busy(workers)
        assert serving is not None
        serving.process.kill()  # SIGKILL while it computes: no byte of the answer was sent
    finally:
        thread.join(timeout=60)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert response.headers["x-das-worker"] != serving.url
    assert response.json()["choices"][0]["finish_reason"] == "length"


# -- a client that leaves -----------------------------------------------------------------------


@pytest.mark.parametrize("through", ["worker", "gateway"])
def test_a_client_that_leaves_a_whole_request_cancels_it(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server], through: str
) -> None:
    """Not streamed: the worker notices the client's connection close, aborts the request
    (its samples stop, its slot is free) and records no rollout; through a gateway too."""
    worker = serve(fake_step_delay_s=0.02)
    target = worker if through == "worker" else serve_gateway([worker.url])
    body = json.dumps({"prompt": "left", "max_tokens": 2000, "ignore_eos": True}).encode()

    def info() -> dict[str, int]:
        reply: dict[str, int] = httpx.get(worker.url + "/get_server_info", timeout=5).json()
        return reply

    with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body) + body
        )
        wait_for(lambda: info()["running_requests"] == 1)
    # Left: without the cancellation it would run for 2000 passes (40 s).
    wait_for(lambda: info()["running_requests"] == 0)
    assert info()["history_groups"] == 0  # the abandoned rollout is no history
    metrics = httpx.get(worker.url + "/metrics", timeout=5).text
    assert 'endpoint="/v1/completions",status="499"' in metrics
    ok = httpx.post(target.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


# -- a frozen worker ----------------------------------------------------------------------------


def test_a_frozen_worker_fails_a_control_call_in_its_timeout_and_is_then_skipped(
    processes: Callable[..., WorkerProcess], serve_gateway: Callable[..., Server]
) -> None:
    workers = [processes() for _ in range(2)]
    # Health checks far apart: the control call is the first to find the worker frozen.
    gateway = serve_gateway([w.url for w in workers], control_timeout_s=1.0, health_interval_s=30)
    live, frozen = workers
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:  # 600 s before this issue
            first = http.post("/pause_generation")
            assert first.status_code == 502
            assert "worker-1" in first.json()["error"]["message"]
            assert frozen.url not in first.text
            paused = http.post("/pause_generation")  # now out of routing: skipped, reported
            assert paused.status_code == 200 and paused.json()["skipped"] == ["worker-1"]
            assert httpx.get(live.url + "/health").json()["status"] == "paused"
            assert http.post("/continue_generation").status_code == 200
            served = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert served.status_code == 200 and served.headers["x-das-worker"] == live.url
            versions = http.get("/get_weight_version").json()
            assert set(versions["workers"]) == {live.url}
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)


# -- a worker that misses a weight update --------------------------------------------------------


def test_a_weight_update_can_set_the_version_and_never_takes_it_back(
    serve: Callable[..., Server],
) -> None:
    worker = serve()
    with httpx.Client(base_url=worker.url, timeout=10) as http:

        def update(**body: object) -> httpx.Response:
            return http.post("/update_weights_from_disk", json={"model_path": "/c", **body})

        assert update().json()["weight_version"] == "1"  # no version: the next one
        assert update(weight_version=7).json()["weight_version"] == "7"
        assert update(weight_version="7").json()["weight_version"] == "7"  # SGLang sends text
        assert http.get("/health").json()["weight_version"] == 7
        assert update().json()["weight_version"] == "8"
        for version, why in ((3, "behind"), (-1, "greater than or equal"), ("v9", "integer")):
            refused = update(weight_version=version, abort_all_requests=True)
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == "weight_version" and why in error["message"]
        assert http.get("/get_weight_version").json()["weight_version"] == "8"


def test_a_worker_that_missed_a_weight_update_is_caught_up_and_routed_again(
    processes: Callable[..., WorkerProcess],
    serve_gateway: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: the update answered 502 while the live worker moved on, and the restarted
    worker rejoined at v0 to serve beside it (then, held out, it never came back). Now the
    gateway re-sends it the update that reached the announced version, set to that version,
    and routes to it once its /health reports it: traffic running through the restart and
    the catch-up is answered on version 2 only, and then by both workers."""
    caplog.set_level(logging.WARNING, logger="service.gateway")
    live, missed = processes(), processes()
    gateway = serve_gateway([live.url, missed.url], health_interval_s=0.1, health_failures=1)
    answers: list[tuple[int, str, object]] = []  # (status, worker, weight_version)
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            i = 0
            while not stop.is_set():
                body = {"prompt": f"p{i}", "max_tokens": 2, "prompt_group": f"g{i % 16}"}
                response = http.post("/v1/completions", json=body)
                reply = response.json()
                answers.append(
                    (response.status_code, response.headers.get("x-das-worker", ""),
                     reply.get("weight_version"))
                )  # fmt: skip
                i += 1

    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.post("/update_weights_from_disk", json={"model_path": "/ckpt/1"}).is_success
        missed.kill()  # SIGKILL
        update = http.post("/update_weights_from_disk", json={"model_path": "/ckpt/2"})
        assert update.status_code == 502  # the caller learns that one worker missed it
        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            wait_for(lambda: len(answers) >= 5)  # served by the live worker meanwhile
            back = processes(port=missed.port)  # restarted: its start-up version, 0
            wait_for(lambda: any(worker == back.url for _, worker, _ in answers))
        finally:
            stop.set()
            thread.join(timeout=60)
        assert answers and all(status == 200 for status, _, _ in answers), answers[-3:]
        assert {version for _, _, version in answers} == {"2"}  # never served while stale
        assert {worker for _, worker, _ in answers} == {live.url, back.url}
        versions = http.get("/get_weight_version").json()
        assert versions == {
            "weight_version": "2", "workers": {live.url: "2", back.url: "2"}, "skew": []
        }  # fmt: skip
    assert "worker-1 was caught up to policy version 2" in caplog.text
    outcomes = {
        labels["outcome"]: value
        for labels, value in metric_values(gateway.url, "das_gateway_catch_ups_total")
        if labels["worker"] == missed.url
    }
    assert outcomes.get("caught_up", 0) >= 1


def test_a_gateway_started_after_the_update_catches_up_a_worker_behind(
    processes: Callable[..., WorkerProcess],
    serve_gateway: Callable[..., Server],
) -> None:
    """The gateway that sent an update goes away, and a worker comes back at its start-up
    version: a new gateway announces the newest version the workers report, holds the other
    out, and catches it up with the update the up-to-date worker last loaded (its
    weights_path), set to that version."""
    live, missed = processes(), processes()
    first = serve_gateway([live.url, missed.url], health_interval_s=0.1)
    with httpx.Client(base_url=first.url, timeout=30) as http:
        assert http.post("/update_weights_from_disk", json={"model_path": "/ckpt/1"}).is_success
        missed.kill()
        assert (
            http.post("/update_weights_from_disk", json={"model_path": "/ckpt/2"}).status_code
            == 502
        )
    first.stop()
    back = processes(port=missed.port)  # at version 0
    gateway = serve_gateway([live.url, back.url], health_interval_s=0.1)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:

        def versions() -> dict[str, Any]:
            reply: dict[str, Any] = http.get("/get_weight_version").json()
            return reply

        wait_for(lambda: versions()["skew"] == [])
        assert versions() == {
            "weight_version": "2", "workers": {live.url: "2", back.url: "2"}, "skew": []
        }  # fmt: skip
        info = httpx.get(back.url + "/get_server_info", timeout=10).json()
        assert info["weights_path"] == "/ckpt/2"  # the live worker's last update, re-sent


def test_a_worker_that_cannot_be_caught_up_stays_held_out_and_is_tried_again(
    processes: Callable[..., WorkerProcess],
    serve_gateway: Callable[..., Server],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker updated behind the gateway's back (to 3) is ahead of the announced version 1:
    the catch-up cannot take it back (its 400 is logged), so it stays held out and is tried
    again, backing off; the next update through the gateway brings the two together."""
    caplog.set_level(logging.WARNING, logger="service.gateway")
    a, b = processes(), processes()
    gateway = serve_gateway([a.url, b.url], health_interval_s=0.1, catch_up_max_backoff_s=0.4)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:

        def info() -> dict[str, Any]:
            reply: dict[str, Any] = http.get("/get_server_info").json()
            return reply

        assert http.post("/update_weights_from_disk", json={"model_path": "/c/1"}).is_success
        for expected in ("2", "3"):
            direct = httpx.post(b.url + "/update_weights_from_disk", json={"model_path": "/x"})
            assert direct.json()["weight_version"] == expected
        wait_for(lambda: info()["workers"][1]["catch_up_failures"] >= 3)  # tried, and again
        worker_b = info()["workers"][1]
        assert worker_b["weight_version"] == "3" and worker_b["routable"] is False
        assert info()["skew"] == ["worker-1"]
        for i in range(12):  # groups that hash to either worker: all served on version 1
            body = {"prompt": f"p{i}", "max_tokens": 2, "prompt_group": f"g{i}"}
            response = http.post("/v1/completions", json=body)
            assert response.headers["x-das-worker"] == a.url
            assert response.json()["weight_version"] == "1"
        assert "catch-up to policy version 1 failed (400 weight_version 1 is behind" in caplog.text
        failed = [
            value
            for labels, value in metric_values(gateway.url, "das_gateway_catch_ups_total")
            if labels == {"worker": b.url, "outcome": "failed"}
        ]
        assert failed and failed[0] >= 3
        # An update through the gateway: a goes to 2, b to 4, which it announces; a is caught up.
        update = http.post("/update_weights_from_disk", json={"model_path": "/c/2"})
        assert update.json()["weight_version"] == "4"
        wait_for(lambda: all(w["routable"] for w in info()["workers"]))
        assert [w["weight_version"] for w in info()["workers"]] == ["4", "4"]
        assert info()["skew"] == []


def test_a_gateway_started_beside_workers_on_two_versions_holds_out_the_older(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server]
) -> None:
    ahead, behind = serve(), serve()
    assert httpx.post(ahead.url + "/update_weights_from_disk", json={"model_path": "/c/1"})
    gateway = serve_gateway([ahead.url, behind.url])
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        versions = http.get("/get_weight_version").json()
        assert versions["weight_version"] == "1" and versions["skew"] == ["worker-1"]
        for i in range(8):
            body = {"prompt": "x", "max_tokens": 2, "prompt_group": f"g{i}"}
            assert http.post("/v1/completions", json=body).headers["x-das-worker"] == ahead.url


def test_a_request_on_a_worker_that_freezes_is_retried_elsewhere(
    processes: Callable[..., WorkerProcess], serve_gateway: Callable[..., Server]
) -> None:
    """The worker computing a whole request is stopped (SIGSTOP): once its health checks fail
    the gateway drops its connections and the request, not answered yet, goes to the other
    worker (before this issue it waited for --upstream-timeout, 600 s)."""
    workers = [processes("--fake-step-delay", "0.02") for _ in range(2)]
    gateway = serve_gateway([w.url for w in workers], health_interval_s=0.2, health_failures=1)
    outcome: dict[str, httpx.Response] = {}

    def run() -> None:
        body = {**LONG, "max_tokens": 150}
        outcome["response"] = httpx.post(gateway.url + "/v1/completions", json=body, timeout=60)

    thread = threading.Thread(target=run)
    thread.start()
    frozen: WorkerProcess | None = None
    try:
        wait_for(lambda: busy(workers) is not None)
        frozen = busy(workers)
        assert frozen is not None
        os.kill(frozen.process.pid, signal.SIGSTOP)
        thread.join(timeout=60)
    finally:
        if frozen is not None:
            os.kill(frozen.process.pid, signal.SIGCONT)
        thread.join(timeout=60)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert response.headers["x-das-worker"] != frozen.url
