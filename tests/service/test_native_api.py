"""SGLang /generate, vLLM /inference/v1/generate and the control endpoints over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.service.conftest import Server


PROMPT = [72, 101, 108, 108, 111]


def test_sglang_generate_input_ids(client: httpx.Client) -> None:
    body = {
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0.7, "sampling_seed": 4},
        "return_logprob": True,
        "rid": "sg-1",
    }
    out = client.post("/generate", json=body).json()
    meta = out["meta_info"]
    assert meta["id"] == "sg-1"
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == len(out["output_ids"])
    assert meta["finish_reason"]["type"] in ("stop", "length")
    triples = meta["output_token_logprobs"]
    assert [t[1] for t in triples] == out["output_ids"] and all(t[2] is None for t in triples)
    assert meta["weight_version"] == "0"
    assert meta["spec_verify_ct"] >= 1
    assert meta["spec_accept_length"] == meta["completion_tokens"] / meta["spec_verify_ct"]
    again = client.post("/generate", json={**body, "rid": "sg-2"}).json()
    assert again["output_ids"] == out["output_ids"]


def test_sglang_generate_text_batch_n_and_stops(client: httpx.Client) -> None:
    out = client.post(
        "/generate",
        json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 4, "n": 2}},
    ).json()
    assert isinstance(out, list) and len(out) == 4
    assert all(o["meta_info"]["finish_reason"] == {"type": "length", "length": 4} for o in out)
    batch = client.post(
        "/generate",
        json={"input_ids": [PROMPT, [1, 2, 3]], "rid": ["x1", "x2"],
              "sampling_params": {"max_new_tokens": 3}},
    ).json()  # fmt: skip
    assert [o["meta_info"]["id"] for o in batch] == ["x1", "x2"]
    greedy = client.post(
        "/generate",
        json={"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 400}},
    ).json()
    token = greedy["output_ids"][3]
    stopped = client.post(
        "/generate",
        json={"input_ids": PROMPT,
              "sampling_params": {"temperature": 0, "max_new_tokens": 400,
                                  "stop_token_ids": [token]}},
    ).json()  # fmt: skip
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
    assert stopped["output_ids"][-1] == token


def test_sglang_stream(client: httpx.Client) -> None:
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 30, "sampling_seed": 1}}
    whole = client.post("/generate", json=body).json()
    response = client.post("/generate", json={**body, "stream": True})
    lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["output_ids"] == whole["output_ids"]  # cumulative, as SGLang streams
    assert chunks[-1]["text"] == whole["text"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] is not None


def test_sglang_errors(client: httpx.Client) -> None:
    for body in (
        {},
        {"input_ids": PROMPT, "text": "x"},
        {"input_ids": []},
        {"input_ids": [PROMPT, PROMPT], "rid": ["only-one"]},
        {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": -1}},
        {"input_ids": PROMPT, "top_logprobs_num": 2},
        {"input_ids": "not ids"},
    ):
        response = client.post("/generate", json=body)
        assert response.status_code == 400, body
        assert response.json()["error"]["code"] == 400


def test_vllm_token_in_token_out(client: httpx.Client) -> None:
    body = {
        "token_ids": PROMPT,
        "sampling_params": {"max_tokens": 10, "seed": 3, "logprobs": 1},
        "request_id": "v-1",
    }
    out = client.post("/inference/v1/generate", json=body).json()
    choice = out["choices"][0]
    assert out["request_id"] == "v-1" and out["prompt_token_ids"] == PROMPT
    assert len(choice["token_ids"]) == out["usage"]["completion_tokens"] <= 10
    assert choice["finish_reason"] in ("stop", "length")
    content = choice["logprobs"]["content"]
    assert [c["token_id"] for c in content] == choice["token_ids"]
    assert all(c["logprob"] <= 0 for c in content)
    assert out["spec"]["forward_passes"] >= 1
    assert client.post("/inference/v1/generate", json={**body, "stream": True}).status_code == 400
    assert client.post("/inference/v1/generate", json={"token_ids": []}).status_code == 400
    bad_model = client.post("/inference/v1/generate", json={**body, "model": "x"})
    assert bad_model.status_code == 404


def _post_later(url: str, path: str, body: dict[str, Any], out: dict[str, Any]) -> threading.Thread:
    def go() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            response = http.post(path, json=body)
            out["status"] = response.status_code
            out["body"] = response.json()

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def _until_running(http: httpx.Client) -> None:
    """Wait until the worker runs a request and has generated some of it (a loaded machine
    may take longer than any fixed sleep)."""
    deadline = time.monotonic() + 30
    while http.get("/get_server_info").json()["running_requests"] < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    time.sleep(0.05)


def test_abort_returns_partial_output(serve: Callable[..., Server]) -> None:
    server = serve(fake_step_delay_s=0.005, speculation=False)
    out: dict[str, Any] = {}
    body = {"input_ids": PROMPT, "rid": "long-1",
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}  # fmt: skip
    thread = _post_later(server.url, "/generate", body, out)
    with httpx.Client(base_url=server.url) as http:
        _until_running(http)
        assert http.post("/abort_request", json={"rid": "long-1"}).status_code == 200
        thread.join(10)
        meta = out["body"]["meta_info"]
        assert meta["finish_reason"]["type"] == "abort"
        assert 0 < meta["completion_tokens"] < 2000
        # abort_all reaches OpenAI requests too (their id is the X-Request-Id header here).
        out2: dict[str, Any] = {}
        body2 = {"prompt": "x", "max_tokens": 2000, "ignore_eos": True}
        thread = _post_later(server.url, "/v1/completions", body2, out2)
        _until_running(http)
        assert http.post("/abort_request", json={"abort_all": True}).status_code == 200
        thread.join(10)
        assert out2["body"]["choices"][0]["finish_reason"] == "abort"
        assert http.post("/abort_request", json={}).status_code == 400


def test_pause_queues_requests_until_continue(serve: Callable[..., Server]) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as http:
        assert http.post("/pause_generation").status_code == 200
        assert http.get("/health").json()["status"] == "paused"
        assert http.get("/health_generate").status_code == 503
        out: dict[str, Any] = {}
        thread = _post_later(server.url, "/v1/completions", {"prompt": "p", "max_tokens": 3}, out)
        time.sleep(0.2)
        assert "status" not in out
        assert http.get("/get_server_info").json()["queued_requests"] == 1
        assert http.post("/continue_generation").status_code == 200
        thread.join(10)
        assert out["status"] == 200 and out["body"]["usage"]["completion_tokens"] == 3
        assert http.get("/health_generate").status_code == 200


def test_weights_versions_and_flush_cache(serve: Callable[..., Server]) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as http:
        http.post("/v1/completions", json={"prompt": "keep me", "max_tokens": 8})
        groups = http.get("/get_server_info").json()["history_groups"]
        assert groups >= 1
        flushed = http.post("/flush_cache")
        assert flushed.status_code == 200 and flushed.json()["success"]
        assert http.get("/get_server_info").json()["history_groups"] == groups  # history kept
        assert http.get("/get_weight_version").json() == {"weight_version": "0"}
        updated = http.post("/update_weights_from_disk", json={"model_path": "/ckpt/step-1"})
        assert updated.json()["weight_version"] == "1"
        assert http.get("/get_weight_version").json() == {"weight_version": "1"}
        out = http.post("/generate", json={"input_ids": PROMPT}).json()
        assert out["meta_info"]["weight_version"] == "1"
        assert http.post("/update_weights_from_disk", json={"model_path": ""}).status_code == 400
        assert http.post("/update_weights_from_disk", json={}).status_code == 400
        text = http.get("/metrics").text
        assert 'das_policy_version{worker="' in text and "} 1.0" in text


def test_health_and_server_info(client: httpx.Client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/health_generate").json() == {"status": "ok"}
    info = client.get("/get_server_info").json()
    assert info["backend"] == "fake" and info["worker"] == "shared"
    assert info["speculation"] is True
