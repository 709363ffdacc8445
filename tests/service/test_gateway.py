"""The gateway in front of two FakeWorker apps, everything over real HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.service.conftest import Server


@pytest.fixture
def cluster(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server]
) -> tuple[Server, list[Server]]:
    workers = [serve(), serve()]
    gateway = serve_gateway([w.url for w in workers], health_interval_s=0.1, health_failures=1)
    return gateway, workers


def completion(http: httpx.Client, group: str, **extra: object) -> httpx.Response:
    body = {"model": "fake", "prompt": f"prompt of {group}", "max_tokens": 8, **extra}
    return http.post("/v1/completions", json=body, headers={"X-Session-ID": group})


def test_groups_stick_to_a_worker_and_spread(cluster: tuple[Server, list[Server]]) -> None:
    gateway, workers = cluster
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        homes = {}
        for i in range(24):
            response = completion(http, f"g{i}")
            assert response.status_code == 200
            homes[f"g{i}"] = response.headers["x-das-worker"]
        assert set(homes.values()) == {w.url for w in workers}
        for group, home in list(homes.items())[:8]:
            assert completion(http, group).headers["x-das-worker"] == home


def test_official_client_and_streams_through_the_gateway(
    cluster: tuple[Server, list[Server]],
) -> None:
    gateway, _ = cluster
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == ["fake"]
    whole = client.completions.create(model="fake", prompt="through", max_tokens=20, seed=2)
    parts = client.completions.create(
        model="fake", prompt="through", max_tokens=20, seed=2, stream=True
    )
    assert "".join(c.choices[0].text for c in parts if c.choices) == whole.choices[0].text
    chat = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.choices[0].message.content is not None
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        sglang = http.post("/generate", json={"input_ids": [1, 2, 3], "stream": True})
        assert sglang.text.rstrip().endswith("data: [DONE]")
        vllm = http.post("/inference/v1/generate", json={"token_ids": [1, 2, 3]})
        assert vllm.status_code == 200 and vllm.json()["choices"][0]["token_ids"]


def test_errors_pass_through_and_gateway_errors_are_shaped(
    cluster: tuple[Server, list[Server]],
) -> None:
    gateway, _ = cluster
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        unknown = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
        invalid = http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        assert invalid.status_code == 400
        bad = http.post(
            "/v1/completions", content=b"[1, 2", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == 400
        not_object = http.post("/generate", json=[1, 2])
        assert not_object.status_code == 400
        assert http.get("/nowhere").status_code == 404


def test_control_calls_reach_every_worker(cluster: tuple[Server, list[Server]]) -> None:
    gateway, workers = cluster
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        updated = http.post("/update_weights_from_disk", json={"model_path": "/ckpt/1"})
        assert updated.status_code == 200 and updated.json()["weight_version"] == "1"
        versions = http.get("/get_weight_version").json()
        assert versions["weight_version"] == "1"
        assert set(versions["workers"].values()) == {"1"}
        for worker in workers:
            assert httpx.get(worker.url + "/get_weight_version").json()["weight_version"] == "1"
        failed = http.post("/update_weights_from_disk", json={"model_path": ""})
        assert failed.status_code == 400 and "workers failed" in failed.json()["error"]["message"]
        assert http.post("/pause_generation").status_code == 200
        assert all(httpx.get(w.url + "/health").json()["status"] == "paused" for w in workers)
        assert http.post("/continue_generation").status_code == 200
        assert http.post("/flush_cache").status_code == 200
        assert http.post("/abort_request", json={"abort_all": True}).status_code == 200
        assert http.get("/health").json()["status"] == "ok"
        assert http.get("/health_generate").status_code == 200
        info = http.get("/get_server_info").json()
        assert info["role"] == "gateway" and len(info["workers"]) == 2
        metrics = http.get("/metrics").text
        assert "das_gateway_upstream_requests_total" in metrics
        assert "das_gateway_worker_up" in metrics


def test_dead_worker_groups_move(cluster: tuple[Server, list[Server]]) -> None:
    gateway, workers = cluster
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        homes = {f"g{i}": completion(http, f"g{i}").headers["x-das-worker"] for i in range(16)}
        dead = workers[0]
        dead.stop()
        # Requests for the dead worker's groups are retried on the other one at once.
        for group in homes:
            response = completion(http, group)
            assert response.status_code == 200
            assert response.headers["x-das-worker"] == workers[1].url
        deadline = time.monotonic() + 5
        while http.get("/get_server_info").json()["workers"][0]["healthy"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers[1].stop()
        down = completion(http, "g0")
        assert down.status_code in (502, 503) and down.json()["error"]["code"] == down.status_code
        deadline = time.monotonic() + 5
        while http.get("/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_gateway_api_key(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server]
) -> None:
    worker = serve(api_key="inner")
    gateway = serve_gateway([worker.url], api_key="outer", worker_api_key="inner")
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        assert http.get("/health").status_code == 200
        assert completion(http, "g").status_code == 401
        auth = {"Authorization": "Bearer outer", "X-Session-ID": "g"}
        ok = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=auth)
        assert ok.status_code == 200, ok.text
        stream = http.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True}, headers=auth
        )
        lines = [line for line in stream.text.split("\n") if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["choices"]


def test_a_worker_too_slow_is_a_504(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server]
) -> None:
    worker = serve(fake_step_delay_s=0.02, speculation=False)
    gateway = serve_gateway([worker.url], upstream_timeout_s=0.2)
    with httpx.Client(base_url=gateway.url, timeout=10) as http:
        slow = completion(http, "g", max_tokens=40, ignore_eos=True)  # about 0.8 s
        assert slow.status_code == 504
        error = slow.json()["error"]
        assert error["code"] == 504 and error["type"] == "upstream_timeout"
        assert completion(http, "g", max_tokens=2).status_code == 200
