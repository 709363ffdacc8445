"""The embedded engine behind the real HTTP API (uvicorn on a free port, tiny-random)."""

from __future__ import annotations

import json
import os
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
import torch
from prometheus_client.parser import text_string_to_metric_families

from drafter.draft import DRAFT_SOURCES
from service.engine.models import tiny_random_model
from service.settings import Settings
from service.worker_app import create_app
from tests.service.conftest import Server, free_port, start_server

PROMPT = [5, 6, 7, 8, 9, 10]
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 1234}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: keep one free
    yield
    torch.set_num_threads(threads)


def engine_server(**overrides: Any) -> Server:
    port = free_port()
    settings = Settings(
        **{"model": "tiny-random", "port": port, "worker_id": f"e{port}", "max_model_len": 512,
           "max_batch": 8, **overrides}
    )  # fmt: skip
    return start_server(create_app(settings), port)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Server]]:
    """Workers that differ only in speculation: none, fixed:4, das and suffix."""
    started = {
        "none": engine_server(speculation=False),
        "fixed:4": engine_server(spec_policy="fixed:4"),
        "das": engine_server(spec_policy="das"),
        "suffix": engine_server(spec_policy="suffix"),
    }
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture
def fresh() -> Iterator[Callable[..., Server]]:
    """Workers of a test's own (state it changes: pause, weights)."""
    started: list[Server] = []

    def start(**overrides: Any) -> Server:
        server = engine_server(**overrides)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def http(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60)


def complete(server: Server, **body: Any) -> dict[str, Any]:
    with http(server) as client:
        reply = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, **body})
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def test_token_id_completions_httpx_and_openai(servers: dict[str, Server]) -> None:
    server = servers["none"]
    data = complete(server, return_token_ids=True, logprobs=2, **SAMPLED)
    choice = data["choices"][0]
    assert len(choice["token_ids"]) == 24 and choice["finish_reason"] == "length"
    assert choice["prompt_token_ids"] == PROMPT and data["model"] == "tiny-random"
    assert len(choice["logprobs"]["token_logprobs"]) == 24
    assert data["usage"] == {"prompt_tokens": 6, "completion_tokens": 24, "total_tokens": 30}

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    assert [m.id for m in client.models.list()] == ["tiny-random"]
    same = client.completions.create(
        model="tiny-random",
        prompt=PROMPT,
        max_tokens=24,
        extra_body={"return_token_ids": True},
        **SAMPLED,  # type: ignore[arg-type]
    )
    assert same.choices[0].finish_reason == "length"
    assert same.usage is not None and same.usage.completion_tokens == 24
    assert same.model_extra is not None
    assert same.choices[0].model_extra["token_ids"] == choice["token_ids"]  # type: ignore[index]


def test_sglang_and_vllm_generate(servers: dict[str, Server]) -> None:
    with http(servers["none"]) as client:
        sglang = client.post(
            "/generate",
            json={
                "input_ids": PROMPT,
                "sampling_params": {"max_new_tokens": 12, "sampling_seed": 3, "temperature": 0.8},
                "return_logprob": True,
            },
        ).json()
        vllm = client.post(
            "/inference/v1/generate",
            json={
                "token_ids": PROMPT,
                "sampling_params": {"max_tokens": 12, "seed": 3, "temperature": 0.8, "logprobs": 0},
            },
        ).json()
    meta = sglang["meta_info"]
    assert len(sglang["output_ids"]) == 12 and meta["finish_reason"]["type"] == "length"
    assert meta["weight_version"] == "0" and meta["spec_verify_ct"] == 12
    logprobs = [entry[0] for entry in meta["output_token_logprobs"]]
    assert [entry[1] for entry in meta["output_token_logprobs"]] == sglang["output_ids"]
    choice = vllm["choices"][0]
    assert choice["token_ids"] == sglang["output_ids"]  # same seed, same target
    vllm_logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
    assert vllm_logprobs == pytest.approx(logprobs, abs=1e-6)
    assert vllm["prompt_token_ids"] == PROMPT and vllm["weight_version"] == "0"


def _rollouts(server: Server, group: str, n: int = 2) -> list[dict[str, Any]]:
    data = complete(
        server,
        n=n,
        max_tokens=40,
        logprobs=1,
        return_token_ids=True,
        prompt_group=group,
        ignore_eos=True,
        **SAMPLED,
    )
    return list(data["choices"])


@pytest.mark.parametrize("policy", ["fixed:4", "das", "suffix"])
def test_lossless_through_the_api(servers: dict[str, Server], policy: str) -> None:
    """Speculation changes the number of forwards, never a token or a logprob."""
    plain, spec = servers["none"], servers[policy]
    group = f"lossless-{policy}"
    expected = _rollouts(plain, group)
    for seed in (1, 2):  # warm the speculative worker's history with the group's rollouts
        complete(spec, prompt_group=group, max_tokens=40, seed=seed, temperature=0.8, n=2)
    _rollouts(spec, group)
    got = _rollouts(spec, group)
    for want, have in zip(expected, got, strict=True):
        assert have["token_ids"] == want["token_ids"]
        assert have["logprobs"]["token_logprobs"] == pytest.approx(
            want["logprobs"]["token_logprobs"], abs=1e-4
        )
        assert want["spec"]["drafted_tokens"] == 0
    accepted = sum(choice["spec"]["accepted_tokens"] for choice in got)
    forwards = sum(choice["spec"]["forward_passes"] for choice in got)
    assert accepted > 0 and forwards < 80
    with http(spec) as client:
        metrics = client.get("/metrics").text
    assert "das_accepted_tokens_total" in metrics and "das_forward_passes_total" in metrics


def test_n_samples_and_streaming(servers: dict[str, Server]) -> None:
    server = servers["das"]
    whole = complete(server, n=3, return_token_ids=True, logprobs=1, **SAMPLED)
    assert sorted(c["index"] for c in whole["choices"]) == [0, 1, 2]
    token_ids = {c["index"]: c["token_ids"] for c in whole["choices"]}
    assert len({tuple(t) for t in token_ids.values()}) == 3  # the samples differ
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    logprobs: dict[int, list[float]] = {0: [], 1: [], 2: []}
    finish: dict[int, str] = {}
    chunks = 0
    body = {"prompt": PROMPT, "max_tokens": 24, "n": 3, "stream": True, "logprobs": 1,
            "return_token_ids": True, **SAMPLED}  # fmt: skip
    with http(server) as client, client.stream("POST", "/v1/completions", json=body) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunks += 1
            for choice in json.loads(line[6:])["choices"]:
                streamed[choice["index"]] += choice["token_ids"]
                logprobs[choice["index"]] += choice["logprobs"]["token_logprobs"]
                if choice["finish_reason"]:
                    finish[choice["index"]] = choice["finish_reason"]
    assert streamed == token_ids and chunks > 3  # deltas, not one chunk per sample
    assert finish == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    # The streamed run drafts from the first one's rollouts: the same tokens, and logprobs
    # within the lossless contract's 1e-4 (verify chunks round differently from single steps).
    for choice in whole["choices"]:
        want = choice["logprobs"]["token_logprobs"]
        assert logprobs[choice["index"]] == pytest.approx(want, abs=1e-4)


def test_text_prompts_need_a_tokenizer(servers: dict[str, Server]) -> None:
    with http(servers["none"]) as client:
        text = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
        chat = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        sglang = client.post("/generate", json={"text": "hi"})
    for reply in (text, chat, sglang):
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert "no tokenizer" in error["message"] and error["code"] == 400
        assert error["type"] == "invalid_request_error"
    client = openai.OpenAI(base_url=f"{servers['none'].url}/v1", api_key="none")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-random", prompt="hello", max_tokens=4)


def test_abort_returns_partial_output(fresh: Callable[..., Server]) -> None:
    server = fresh(max_model_len=2048)
    body = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "return_token_ids": True, "temperature": 0.8}  # fmt: skip
    tokens: list[int] = []
    finish = None
    with http(server) as client, client.stream("POST", "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                tokens += json.loads(line[6:])["choices"][0]["token_ids"]
                break
        with http(server) as control:  # hold it mid-generation, then abort everything
            assert control.post("/pause_generation").status_code == 200
            aborted = control.post("/abort_request", json={"abort_all": True}).json()
            assert control.post("/continue_generation").status_code == 200
        assert aborted["message"] == "aborted 1 requests"
        for line in lines:
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                tokens += choice["token_ids"]
                finish = choice["finish_reason"] or finish
    assert finish == "abort" and 0 < len(tokens) < 2000

    # Non-streamed: the partial tokens come back with finish_reason abort.
    result: dict[str, Any] = {}

    def run() -> None:
        result.update(
            complete(
                server,
                max_tokens=2000,
                ignore_eos=True,
                return_token_ids=True,
                temperature=0.8,
                prompt_group="aborted",
            )
        )

    with http(server) as control:
        control.post("/pause_generation")
        thread = threading.Thread(target=run)
        thread.start()
        _wait_for(lambda: control.get("/get_server_info").json()["queued_requests"] == 1)
        control.post("/continue_generation")
        _wait_for(lambda: control.get("/get_server_info").json()["engine_stats"]["generated_tokens"]
                  > len(tokens) + 5)  # fmt: skip
        control.post("/abort_request", json={"abort_all": True})
        thread.join(timeout=30)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "abort" and 0 < len(choice["token_ids"]) < 2000


def _wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_pause_and_continue(fresh: Callable[..., Server]) -> None:
    server = fresh()
    result: dict[str, Any] = {}
    with http(server) as control:
        assert control.post("/pause_generation").json()["message"] == "paused"
        assert control.get("/health").json()["status"] == "paused"
        thread = threading.Thread(target=lambda: result.update(complete(server, seed=4)))
        thread.start()
        _wait_for(lambda: control.get("/get_server_info").json()["queued_requests"] == 1)
        time.sleep(0.2)
        assert not result  # held while paused
        control.post("/continue_generation")
        thread.join(timeout=30)
        assert control.get("/health").json()["status"] == "ok"
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["choices"][0]["text"] == ""  # no tokenizer: token ids only


def test_update_weights_and_flush_keep_history(
    fresh: Callable[..., Server], tmp_path: Path
) -> None:
    server = fresh(spec_policy="fixed:4")
    before = complete(server, return_token_ids=True, **SAMPLED)["choices"][0]
    with http(server) as client:
        info = client.get("/get_server_info").json()
        assert info["history_groups"] == 1 and info["history_tokens"] > 0
        assert client.post("/flush_cache").status_code == 200
        assert client.get("/get_server_info").json()["history_tokens"] == info["history_tokens"]
        again = complete(server, return_token_ids=True, **SAMPLED)["choices"][0]
        assert again["token_ids"] == before["token_ids"]  # recomputed caches, same output
        assert again["spec"]["accepted_tokens"] > 0  # the history survived the flush

        tiny_random_model(seed=1).save_pretrained(tmp_path / "policy-1")
        path = str(tmp_path / "policy-1")
        reply = client.post("/update_weights_from_disk", json={"model_path": path})
        assert reply.status_code == 200, reply.text
        assert reply.json()["weight_version"] == "1"
        assert client.get("/get_weight_version").json()["weight_version"] == "1"
        info = client.get("/get_server_info").json()
        assert info["history_groups"] == 1 and info["history_tokens"] > 0  # window keeps v0
        bad = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "no")})
        assert bad.status_code == 400 and "cannot load" in bad.json()["error"]["message"]
    after = complete(server, return_token_ids=True, **SAMPLED)
    assert after["weight_version"] == "1"
    assert after["choices"][0]["token_ids"] != before["token_ids"]  # new weights, new policy


@pytest.mark.slow
def test_das_serve_defaults_chat_on_smollm2() -> None:
    """`das serve` with its defaults (SmolLM2, das speculation) answers the openai client."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "das serve did not become healthy"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        reply = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        choice = reply.choices[0]
        assert choice.message.content and choice.message.content.strip()
        assert choice.finish_reason in ("stop", "length")
        assert reply.usage is not None and reply.usage.prompt_tokens > 5
        assert 0 < reply.usage.completion_tokens <= 24
        info = httpx.get(f"{url}/get_server_info", timeout=5).json()
        assert info["spec_policy"] == "das" and info["has_tokenizer"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_draft_tokens_are_counted_by_source(fresh: Callable[..., Server]) -> None:
    """das_source_* split the drafted and accepted tokens by the tree each draft came from;
    the split adds up to the totals, and repeats of a prompt draft from its history."""
    server = fresh(spec_policy="fixed:4", history_live_siblings=True)
    for seed in (1, 2, 3):
        complete(server, prompt_group="by-source", max_tokens=40, seed=seed, n=2)
    with http(server) as client:
        families = text_string_to_metric_families(client.get("/metrics").text)
    totals: dict[str, float] = {}
    split: dict[str, dict[str, float]] = {}
    for family in families:
        for sample in family.samples:
            if sample.name in ("das_drafted_tokens_total", "das_accepted_tokens_total"):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            elif sample.name.startswith("das_source_") and sample.name.endswith("_total"):
                split.setdefault(sample.name, {})[sample.labels["source"]] = sample.value
    drafted = split["das_source_drafted_tokens_total"]
    accepted = split["das_source_accepted_tokens_total"]
    assert set(drafted) <= set(DRAFT_SOURCES) and "history" in drafted, drafted
    assert sum(drafted.values()) == totals["das_drafted_tokens_total"] > 0
    assert sum(accepted.values()) == totals["das_accepted_tokens_total"]
    assert all(accepted.get(source, 0.0) <= drafted[source] for source in drafted)
