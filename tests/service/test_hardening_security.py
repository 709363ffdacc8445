"""Issue 13, security: the admin key guards the control endpoints (workers and gateway), keys
are compared in constant time and a refused request's body is never read, a weight update's
error tells nothing of the worker's filesystem, the gateway shows worker URLs to its admin
only, and a gateway with an API key but none for its workers refuses to start. Real servers
on free ports; the start-up check runs `das gateway` as a process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.gateway import Gateway, check_keys
from service.metrics import Metrics
from service.settings import Settings
from service.web import CONTROL_PATHS, keys_match
from tests.service.conftest import Server

USER, ADMIN = "user-key", "admin-key"
CONTROL_BODIES: dict[str, dict[str, Any]] = {
    "/abort_request": {"abort_all": True},
    "/pause_generation": {},
    "/continue_generation": {},
    "/update_weights_from_disk": {"model_path": "/ckpt/1"},
    "/flush_cache": {},
}
COMPLETION = {"prompt": "x", "max_tokens": 4}


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"authorization": f"Bearer {key}"}


def test_control_bodies_cover_every_control_path() -> None:
    assert set(CONTROL_BODIES) == CONTROL_PATHS


def test_keys_match_in_constant_time_whatever_the_lengths() -> None:
    assert keys_match("k" * 40, "k" * 40)
    assert not keys_match("k", "k" * 40) and not keys_match("k" * 41, "k" * 40)
    assert not keys_match("", "k") and keys_match("ключ", "ключ")
    assert not keys_match("\udcff", "k")  # a header's undecodable byte is no crash


def test_the_admin_key_guards_the_control_endpoints(serve: Callable[..., Server]) -> None:
    server = serve(api_key=USER, admin_api_key=ADMIN)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for path, body in CONTROL_BODIES.items():
            for key in (None, USER, "wrong"):
                refused = http.post(path, json=body, headers=bearer(key))
                assert refused.status_code == 401, (path, key)
                assert refused.json()["error"]["type"] == "authentication_error"
            assert http.post(path, json=body, headers=bearer(ADMIN)).status_code == 200, path
        for key in (USER, ADMIN):  # the admin key is good wherever the API key is
            response = http.post("/v1/completions", json=COMPLETION, headers=bearer(key))
            assert response.status_code == 200
            assert http.get("/get_weight_version", headers=bearer(key)).status_code == 200
        assert http.post("/v1/completions", json=COMPLETION).status_code == 401
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200


def test_an_admin_key_alone_leaves_generation_open(serve: Callable[..., Server]) -> None:
    server = serve(admin_api_key=ADMIN)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/v1/completions", json=COMPLETION).status_code == 200
        assert http.post("/pause_generation").status_code == 401
        assert http.post("/pause_generation", headers=bearer(ADMIN)).status_code == 200
        assert http.post("/continue_generation", headers=bearer(ADMIN)).status_code == 200


def test_without_an_admin_key_the_api_key_guards_control(serve: Callable[..., Server]) -> None:
    server = serve(api_key=USER)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.post("/flush_cache").status_code == 401
        assert http.post("/flush_cache", headers=bearer(USER)).status_code == 200


def test_401_is_decided_before_the_body_is_read(serve: Callable[..., Server]) -> None:
    """A request that announces 50 MB and sends none of it gets its 401 at once: the server
    never waits for the body. Bad JSON without a key is a 401, not a 400."""
    server = serve(api_key=USER, admin_api_key=ADMIN)
    for path, key in (("/v1/completions", None), ("/pause_generation", USER)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            auth = f"authorization: Bearer {key}\r\n" if key else ""
            head = (
                f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n{auth}"
                f"content-length: 50000000\r\n\r\n"
            )
            sock.sendall(head.encode())
            reply = b""
            while b"\r\n\r\n" not in reply:
                data = sock.recv(65536)
                assert data, "the server closed the connection without an answer"
                reply += data
            assert reply.startswith(b"HTTP/1.1 401"), reply[:100]
    with httpx.Client(base_url=server.url, timeout=10) as http:
        response = http.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 401


@pytest.fixture
def keyed_cluster(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server]
) -> tuple[Server, Server]:
    worker = serve(api_key="inner", admin_api_key="inner-admin")
    gateway = serve_gateway(
        [worker.url],
        api_key=USER,
        admin_api_key=ADMIN,
        worker_api_key="inner",
        worker_admin_api_key="inner-admin",
    )
    return gateway, worker


def test_the_gateway_takes_the_admin_key_for_control_and_uses_the_workers(
    keyed_cluster: tuple[Server, Server],
) -> None:
    gateway, worker = keyed_cluster
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        assert http.post("/pause_generation", headers=bearer(USER)).status_code == 401
        assert http.post("/pause_generation", headers=bearer(ADMIN)).status_code == 200
        assert httpx.get(worker.url + "/health").json()["status"] == "paused"
        assert http.post("/continue_generation", headers=bearer(ADMIN)).status_code == 200
        response = http.post("/v1/completions", json=COMPLETION, headers=bearer(USER))
        assert response.status_code == 200


def test_the_gateway_shows_worker_urls_to_its_admin_only(
    keyed_cluster: tuple[Server, Server],
) -> None:
    gateway, worker = keyed_cluster
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        user = bearer(USER)
        response = http.post("/v1/completions", json=COMPLETION, headers=user)
        assert response.headers["x-das-worker"] == "worker-0"
        seen = [
            response.text,
            http.get("/get_server_info", headers=user).text,
            http.get("/get_weight_version", headers=user).text,
            http.get("/health").text,
        ]
        assert all(worker.url not in text and str(worker.port) not in text for text in seen)
        assert http.get("/get_weight_version", headers=user).json()["workers"] == {"worker-0": "0"}
        admin = http.get("/get_server_info", headers=bearer(ADMIN)).json()
        assert admin["workers"][0]["url"] == worker.url
        worker.stop()  # a failure's message names the worker, not its URL
        failed = http.post("/v1/completions", json=COMPLETION, headers=user)
        assert failed.status_code in (502, 503)
        assert worker.url not in failed.text and str(worker.port) not in failed.text


def test_a_gateway_with_an_api_key_and_none_for_its_workers_refuses_to_start() -> None:
    settings = Settings(worker_urls=["http://127.0.0.1:1"], api_key=USER)
    with pytest.raises(ValueError, match="--worker-api-key"):
        check_keys(settings)
    with pytest.raises(ValueError, match="--worker-api-key"):
        Gateway(settings, Metrics())
    check_keys(Settings(worker_urls=["http://127.0.0.1:1"], api_key=USER, worker_api_key="w"))
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "gateway", "--api-key", USER,
         "--worker", "http://127.0.0.1:1", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--worker-api-key" in done.stderr and "Traceback" not in done.stderr


def test_client_keys_are_api_keys_and_a_gateway_needs_one_for_its_workers(
    serve: Callable[..., Server],
) -> None:
    worker = serve(client_api_keys=["c-1", "c-2"])  # no --api-key: the client keys guard it
    with httpx.Client(base_url=worker.url, timeout=10) as http:
        body = {"prompt": "x", "max_tokens": 2}
        assert http.post("/v1/completions", json=body).status_code == 401
        for key in ("c-1", "c-2"):
            auth = {"authorization": f"Bearer {key}"}
            assert http.post("/v1/completions", json=body, headers=auth).status_code == 200
        assert http.get("/health").status_code == 200
    with pytest.raises(ValueError, match="--worker-api-key"):
        check_keys(Settings(worker_urls=["http://127.0.0.1:1"], client_api_keys=["c-1"]))


# -- no filesystem probing (the embedded engine, tiny random model) ----------------------------


def test_weight_update_errors_tell_nothing_of_the_filesystem(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    server = serve(
        model="tiny-random", max_model_len=64, max_batch=1, speculation=False,
        cost_model="smollm2-cpu",
    )  # fmt: skip
    (tmp_path / "weights.bin").write_bytes(b"not a checkpoint")
    (tmp_path / "folder").mkdir()
    probes = [tmp_path / "missing", tmp_path / "weights.bin", tmp_path / "folder", Path("/etc")]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        errors = []
        for path in probes:
            response = http.post("/update_weights_from_disk", json={"model_path": str(path)})
            assert response.status_code == 400
            errors.append(response.json()["error"])
    assert all(error == errors[0] for error in errors), errors  # indistinguishable
    assert errors[0]["param"] == "model_path" and str(tmp_path) not in json.dumps(errors)
