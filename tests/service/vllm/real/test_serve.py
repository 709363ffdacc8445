"""`das worker --backend vllm` (a real vLLM on SmolLM2 behind our worker app) through the
official openai client and our other dialects: completions, chat, streaming, n > 1, logprobs,
token ids; speculation with logprobs; control endpoints; the rollouts in Redis; metrics.

One server for the module, started by the CLI with an extra vLLM engine flag after -- (vLLM's
engine core in its own process, the cost model calibrated on vLLM's own steps)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

pytestmark = pytest.mark.slow

PROMPT = "List the first twenty prime numbers, separated by commas:"
STARTUP_S = 300
ENGINE_FLAGS = ["--max-num-batched-tokens", "4096"]  # after --: handed to vLLM's engine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    das = str(Path(sys.executable).parent / "das")
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                das,
                "worker",
                "--backend",
                "vllm",
                "--port",
                str(port),
                "--redis-url",
                redis_url,
                "--",
                *ENGINE_FLAGS,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("das serve --backend vllm did not start:\n" + log_path.read_text()[-4000:])
        time.sleep(0.5)
    yield url
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def info(server: str) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(server + "/get_server_info", timeout=10).json()
    return out


def generate(server: str, rid: str, **params: Any) -> dict[str, Any]:
    body = {
        "text": PROMPT,
        "rid": rid,
        "sampling_params": {"max_new_tokens": 64, "temperature": 0.0, **params},
        "return_logprob": True,
        "prompt_group": "primes",
    }
    response = httpx.post(server + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    out: dict[str, Any] = response.json()
    return out


def test_server_info_and_the_calibrated_cost_model(server: str) -> None:
    data = info(server)
    assert data["backend"] == "vllm" and data["speculation"] is True
    assert data["vllm_engine_args"] == ENGINE_FLAGS
    cost = data["cost_model"]
    assert cost is not None and cost["source"] == "calibrated on vLLM's steps"
    assert 0 < cost["c_tok"] < cost["c_base"] < 5.0


def test_completions_n_logprobs_token_ids(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="smollm2-135m",
        prompt=PROMPT,
        max_tokens=24,
        temperature=0.0,
        n=2,
        logprobs=2,
        extra_body={"return_token_ids": True},
    )
    assert len(response.choices) == 2
    first, second = response.choices
    assert first.text == second.text and first.text  # greedy: both samples agree
    assert first.logprobs is not None and len(first.logprobs.token_logprobs) == 24
    assert all(lp <= 0.0 for lp in first.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in first.logprobs.top_logprobs)
    token_ids = first.model_extra["token_ids"]
    assert len(token_ids) == 24


def test_chat_and_streaming(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16,
        temperature=0.7,
        seed=3,
        logprobs=True,
    )
    assert chat.choices[0].message.content
    assert chat.choices[0].logprobs is not None
    whole = client.completions.create(
        model="smollm2-135m", prompt=PROMPT, max_tokens=32, temperature=0.0
    )
    pieces = client.completions.create(
        model="smollm2-135m", prompt=PROMPT, max_tokens=32, temperature=0.0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in pieces)
    assert text == whole.choices[0].text


def test_speculation_with_logprobs_and_the_history(server: str, redis_url: str) -> None:
    """The same prompt again at T = 0: drafts from its group's history are accepted, and the
    logprobs come back all the same (vLLM 0.32 keeps speculation on with logprobs)."""
    first = generate(server, "spec-0")
    second = generate(server, "spec-1")
    meta = second["meta_info"]
    assert second["output_ids"] == first["output_ids"]
    assert meta["spec_accepted_tokens"] > 0
    assert meta["spec_verify_ct"] < meta["completion_tokens"]
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
    keys = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while keys.xlen("das:rollouts:primes") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keys.xlen("das:rollouts:primes") >= 2  # the rollouts reached Redis
    keys.close()
    assert info(server)["history_groups"] >= 1


def test_vllm_token_in_token_out(server: str) -> None:
    ids = httpx.post(
        server + "/v1/completions",
        json={
            "model": "smollm2-135m",
            "prompt": "Hello",
            "max_tokens": 1,
            "return_token_ids": True,
        },
        timeout=60,
    ).json()["choices"][0]["prompt_token_ids"]
    response = httpx.post(
        server + "/inference/v1/generate",
        json={"token_ids": ids, "sampling_params": {"max_tokens": 8, "temperature": 0.0}},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"][0]["token_ids"]) == 8


def test_abort_flush_weights_and_pause(server: str, redis_url: str) -> None:
    results: dict[str, Any] = {}

    def long_request() -> None:
        results["out"] = generate(
            server, "long-0", max_new_tokens=900, ignore_eos=True, temperature=0.7
        )

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(3.0)
    aborted = httpx.post(server + "/abort_request", json={"rid": "long-0"}, timeout=30)
    assert aborted.status_code == 200
    thread.join(60)
    meta = results["out"]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert 0 < meta["completion_tokens"] < 900

    before = info(server)["history_tokens"]
    assert httpx.post(server + "/flush_cache", timeout=30).status_code == 200
    assert info(server)["history_tokens"] == before  # the history survives a flush

    path = info(server)["model_path"]
    updated = httpx.post(
        server + "/update_weights_from_disk", json={"model_path": path}, timeout=120
    )
    assert updated.status_code == 200, updated.text
    assert httpx.get(server + "/get_weight_version", timeout=10).json()["weight_version"] == "1"
    assert generate(server, "after-reload")["meta_info"]["weight_version"] == "1"
    # A worker that missed updates is brought to the deployment's version (the gateway's
    # catch-up): the update sets it; one that would go back, or a path that is not a
    # checkpoint, is a 400 that says nothing of the worker's filesystem.
    updated = httpx.post(
        server + "/update_weights_from_disk",
        json={"model_path": path, "weight_version": "5"},
        timeout=120,
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["weight_version"] == "5"
    assert generate(server, "after-set")["meta_info"]["weight_version"] == "5"
    behind = httpx.post(
        server + "/update_weights_from_disk",
        json={"model_path": path, "weight_version": 3},
        timeout=30,
    )
    assert behind.status_code == 400 and behind.json()["error"]["param"] == "weight_version"
    for missing in ("/nonexistent/checkpoint", "/etc"):
        refused = httpx.post(
            server + "/update_weights_from_disk", json={"model_path": missing}, timeout=120
        )
        assert refused.status_code == 400, refused.text
        assert missing not in refused.text and "directory" not in refused.text
    assert httpx.get(server + "/get_weight_version", timeout=10).json()["weight_version"] == "5"

    assert httpx.post(server + "/pause_generation", timeout=30).status_code == 200
    assert info(server)["paused"] is True
    assert httpx.post(server + "/continue_generation", timeout=30).status_code == 200
    assert generate(server, "after-pause")["meta_info"]["completion_tokens"] > 0


def test_metrics_come_from_inside_vllm(server: str) -> None:
    text = httpx.get(server + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("das_accepted_tokens_total", "das_forward_passes_total")):
            name, value = line.rsplit(" ", 1)  # one line per length class: summed
            key = name.split("{")[0]
            values[key] = values.get(key, 0.0) + float(value)
    assert values["das_forward_passes_total"] > 0
    assert values["das_accepted_tokens_total"] > 0
    assert "das_generation_length_tokens_bucket" in text or "das_generation_length" in text


def test_the_group_travels_from_the_gateway_into_vllm(
    server: str, redis_url: str, serve_gateway: Callable[..., Any]
) -> None:
    """The gateway routes by the trainer's group (X-Session-ID here); the worker hands it to
    vLLM as sampling_params.extra_args; the engine core records the rollout under it, and the
    Redis stream carries its name."""
    gateway = serve_gateway([server])
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    for i in range(2):
        client.completions.create(
            model="smollm2-135m",
            prompt="Name the planets of the solar system:",
            max_tokens=24,
            temperature=0.0,
            extra_headers={"X-Session-ID": "planets-group"},
            seed=i,
        )
    keys = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while keys.xlen("das:rollouts:planets-group") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keys.xlen("das:rollouts:planets-group") == 2
    keys.close()
