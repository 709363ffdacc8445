"""Issue 13, limits: a body above the limit is a 413 before it is read (worker and gateway),
prompts above the context and prompt + max_tokens above it are 400s naming the dialect's
field, n, prompts per request and stop strings are bounded, a full worker answers 429 with
Retry-After (passed on by the gateway), and /health answers while requests run or are being
refused. Real servers on free ports; no timed assertions."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from service.errors import InvalidRequest, Overloaded
from service.limits import (
    FAKE_MAX_MODEL_LEN,
    MAX_CHARS_PER_TOKEN,
    Fields,
    KeyBudget,
    Limits,
    requested_samples,
)
from service.settings import Settings
from service.worker_app import create_app
from tests.service.conftest import (
    Server,
    free_port,
    metric_values,
    start_server,
    worker_settings,
)

LONG = [65] * (FAKE_MAX_MODEL_LEN - 100)  # fits the fake's context, leaving 100 tokens


def raw_post_head(port: int, path: str, length: int, chunked: bytes | None = None) -> bytes:
    """Send a request head announcing `length` bytes (or a chunked body) and none of them;
    the answer's head and body as far as they came."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        framing = (
            "transfer-encoding: chunked" if chunked is not None else f"content-length: {length}"
        )
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            f"{framing}\r\n\r\n".encode()
            + (chunked or b"")
        )
        reply = b""
        while b"}}" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
        return reply


@pytest.fixture(scope="module")
def limits_worker() -> Iterator[Server]:
    """A FakeWorker with the default body limit, 4 prompts and 256 samples at most."""
    port = free_port()
    settings = worker_settings(
        port=port, worker_id="limits", max_prompts_per_request=4, max_inflight_samples=256
    )
    server = start_server(create_app(settings), port)
    yield server
    server.stop()


@pytest.fixture
def limited(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server]
) -> Iterator[tuple[Server, Server]]:
    worker = serve(max_body_bytes=4096, max_prompts_per_request=4)
    gateway = serve_gateway([worker.url], max_body_bytes=4096)
    yield worker, gateway


def test_a_body_above_the_limit_is_a_413_before_it_is_read(
    limited: tuple[Server, Server],
) -> None:
    for server in limited:
        for path in ("/v1/completions", "/generate"):
            reply = raw_post_head(server.port, path, 50_000_000)  # announced, never sent
            assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
            error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
            assert error["code"] == 413 and "4096" in error["message"]
            # Chunked: refused once the bytes received pass the limit.
            chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"
            reply = raw_post_head(server.port, path, 0, chunked=chunk * 2)
            assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.get("/health").status_code == 200
            small = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert small.status_code == 200
            chunked = http.post(  # a chunked body within the limit is served
                "/v1/completions",
                content=iter([b'{"prompt": "x",', b' "max_tokens": 2}']),
                headers={"content-type": "application/json"},
            )
            assert chunked.status_code == 200, chunked.text


def test_the_default_body_limit_refuses_50_mb(serve: Callable[..., Server]) -> None:
    server = serve()
    assert raw_post_head(server.port, "/v1/completions", 50_000_000).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": [65] * FAKE_MAX_MODEL_LEN}, "prompt"),
        ("/v1/completions", {"prompt": LONG, "max_tokens": 101}, "max_tokens"),
        ("/v1/completions", {"prompt": [LONG, [1]], "max_tokens": 200}, "max_tokens"),
        ("/v1/completions", {"prompt": "a" * (FAKE_MAX_MODEL_LEN * MAX_CHARS_PER_TOKEN + 1)},
         "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 40_000}],
                                  "max_tokens": 1}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "max_completion_tokens": FAKE_MAX_MODEL_LEN},
         "max_completion_tokens"),
        ("/generate", {"input_ids": LONG, "sampling_params": {"max_new_tokens": 101}},
         "sampling_params.max_new_tokens"),
        ("/generate", {"text": ["a" * 40_000]}, "text"),
        ("/inference/v1/generate", {"token_ids": LONG, "sampling_params": {"max_tokens": 101}},
         "sampling_params.max_tokens"),
        ("/v1/completions", {"prompt": ["x"] * 5}, "prompt"),  # max_prompts_per_request 4
        ("/generate", {"input_ids": [[1]] * 5}, "input_ids"),
        ("/v1/completions", {"prompt": "x", "n": 129}, "n"),
        ("/v1/completions", {"prompt": ["x"] * 3, "n": 128}, "n"),  # never fits: 400, not 429
        ("/v1/completions", {"prompt": "x", "stop": "s" * 1025}, "stop"),
    ],
)  # fmt: skip
def test_context_and_count_limits_are_400s_naming_the_field(
    limits_worker: Server, path: str, body: dict[str, Any], param: str
) -> None:
    with httpx.Client(base_url=limits_worker.url, timeout=30) as http:
        response = http.post(path, json=body)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == 400 and error["param"] == param, error
        assert http.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x", "n": 5}, "n"),
        ("/v1/completions", {"prompt": "x", "n": 4, "best_of": 5}, "best_of"),
        ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
        ("/v1/completions", {"prompt": "x", "stop": "s" * 9}, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 5}, "n"),
        ("/generate", {"text": "x", "sampling_params": {"n": 5}}, "sampling_params.n"),
        ("/generate", {"text": "x", "sampling_params": {"stop": ["s" * 9]}},
         "sampling_params.stop"),
        ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"n": 5}},
         "sampling_params.n"),
        ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"stop": ["a"] * 3}},
         "sampling_params.stop"),
    ],
)  # fmt: skip
def test_n_and_stop_limits_are_settings(
    serve: Callable[..., Server], path: str, body: dict[str, Any], param: str
) -> None:
    """--max-n 4, --max-stop-strings 2, --max-stop-chars 8: above them a 400 naming the
    dialect's field, at them served; the OpenAPI schema carries the configured bounds."""
    worker = serve(max_n=4, max_stop_strings=2, max_stop_chars=8)
    with httpx.Client(base_url=worker.url, timeout=30) as http:
        response = http.post(path, json=body)
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"]["param"] == param
        at = {"prompt": "x", "n": 4, "best_of": 4, "stop": ["s" * 8, "t"], "max_tokens": 4}
        assert http.post("/v1/completions", json=at).status_code == 200
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
    n = schemas["CompletionRequest"]["properties"]["n"]
    assert n["minimum"] == 1 and n["maximum"] == 4
    assert schemas["VLLMSamplingParams"]["properties"]["n"]["maximum"] == 4
    text, texts, _ = schemas["SGLangSamplingParams"]["properties"]["stop"]["anyOf"]
    assert text["maxLength"] == 8 and texts["maxItems"] == 2 and texts["items"]["maxLength"] == 8
    assert "x-das-limit" not in json.dumps(schemas)


def test_n_and_stop_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.worker_app import request_limits

    monkeypatch.setenv("DAS_MAX_N", "3")
    monkeypatch.setenv("DAS_MAX_STOP_STRINGS", "0")
    monkeypatch.setenv("DAS_MAX_STOP_CHARS", "5")
    limits = request_limits(worker_settings())
    assert (limits.max_n, limits.max_stop, limits.max_stop_chars) == (3, 0, 5)
    limits.check_sampling(3, (), Fields())
    with pytest.raises(InvalidRequest, match="1 stop strings; at most 0"):
        limits.check_sampling(1, ("a",), Fields(stop="sampling_params.stop"))
    for name in ("DAS_MAX_N", "DAS_MAX_STOP_STRINGS", "DAS_MAX_STOP_CHARS"):
        monkeypatch.delenv(name)
    defaults = request_limits(Settings(model="fake"))
    assert (defaults.max_n, defaults.max_stop, defaults.max_stop_chars) == (128, 16, 1024)


def test_a_prompt_that_fills_the_context_less_max_tokens_is_served(limits_worker: Server) -> None:
    with httpx.Client(base_url=limits_worker.url, timeout=60) as http:
        response = http.post("/v1/completions", json={"prompt": LONG, "max_tokens": 100})
        assert response.status_code == 200


def test_limits_check_directly() -> None:
    limits = Limits(100, max_prompts=2, max_inflight_samples=10)
    limits.check([50, 10], 50, Fields())
    with pytest.raises(ValueError, match="max_model_len"):
        Limits(1)
    for lengths, tokens in (([100], 1), ([50], 51), ([1, 1, 1], 1)):
        with pytest.raises(Exception, match=r"context|prompts"):
            limits.check(lengths, tokens, Fields())
    limits.admit(10, 0)
    with pytest.raises(Exception, match="full"):
        limits.admit(1, 10)


def test_a_full_worker_answers_429_with_retry_after(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server]
) -> None:
    worker = serve(max_inflight_samples=8, fake_step_delay_s=0.05)
    gateway = serve_gateway([worker.url])
    hold = {"prompt": "x", "n": 8, "max_tokens": 2000, "ignore_eos": True, "stream": True,
            "seed": 1}  # fmt: skip
    with (
        httpx.Client(base_url=worker.url, timeout=30) as http,
        http.stream(
            "POST", "/v1/completions", json=hold, headers={"x-request-id": "holder"}
        ) as holding,
    ):
        assert holding.status_code == 200
        lines = holding.iter_lines()
        assert next(lines).startswith("data: ")  # the 8 samples hold the worker
        for server in (worker, gateway):
            for stream in (False, True):
                full = httpx.post(
                    server.url + "/v1/completions",
                    json={"prompt": "y", "max_tokens": 2, "stream": stream},
                    timeout=10,
                )
                assert full.status_code == 429, full.text
                assert full.headers["retry-after"] == "1"
                error = full.json()["error"]
                assert error["code"] == 429 and error["type"] == "rate_limit_error"
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert http.post("/abort_request", json={"rid": "holder"}).status_code == 200
        for _ in lines:  # the aborted stream ends
            pass
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        response = http.post("/v1/completions", json={"prompt": "y", "max_tokens": 2})
        assert response.status_code == 200  # its samples were released


def test_a_key_over_its_budget_gets_429_while_another_key_is_served(
    serve: Callable[..., Server], serve_gateway: Callable[..., Server]
) -> None:
    """Two client keys at a gateway with --max-inflight-samples-per-key 4: key A holds its 4
    samples in a stream, so its next request is a 429 with Retry-After (one that can never
    fit, a 400), while key B's 4 samples are served; A's budget returns when its stream ends.
    The worker itself has room for all of them."""
    worker = serve(api_key="w", fake_step_delay_s=0.05)
    gateway = serve_gateway(
        [worker.url], api_key="key-a", client_api_keys=["key-b"], worker_api_key="w",
        max_inflight_samples_per_key=4,
    )  # fmt: skip
    a, b = ({"authorization": f"Bearer {key}"} for key in ("key-a", "key-b"))
    hold = {"prompt": "x", "n": 4, "max_tokens": 2000, "ignore_eos": True, "stream": True}

    def post(headers: dict[str, str], **body: object) -> httpx.Response:
        payload = {"prompt": "y", "max_tokens": 2, **body}
        return httpx.post(gateway.url + "/v1/completions", json=payload, headers=headers)

    with (
        httpx.Client(base_url=gateway.url, timeout=30) as http,
        http.stream(
            "POST", "/v1/completions", json=hold, headers={**a, "x-request-id": "holder"}
        ) as holding,
    ):
        assert holding.status_code == 200
        lines = holding.iter_lines()
        assert next(lines).startswith("data: ")  # key A's 4 samples are running
        for stream in (False, True):
            full = post(a, stream=stream)
            assert full.status_code == 429, full.text
            assert full.headers["retry-after"] == "1"
            error = full.json()["error"]
            assert error["type"] == "rate_limit_error" and "API key" in error["message"]
        never = post(b, n=5)
        assert never.status_code == 400 and never.json()["error"]["param"] == "n"
        served = post(b, n=4)  # the other key: its own budget
        assert served.status_code == 200 and len(served.json()["choices"]) == 4
        held = metric_values(gateway.url, "das_gateway_key_inflight_samples")
        holder = next(labels["client"] for labels, value in held if value == 4)
        rejected = dict(
            (labels["client"], value)
            for labels, value in metric_values(gateway.url, "das_gateway_key_rejected_total")
        )
        assert rejected == {holder: 2}  # key A's two 429s, counted under its name
        assert post({"authorization": "Bearer nobody"}).status_code == 401
        assert http.post("/abort_request", json={"rid": "holder"}, headers=a).is_success
        for _ in lines:  # the aborted stream ends
            pass
    wait_for_status(lambda: post(a).status_code, 200)  # its samples came back
    held = dict(
        (labels["client"], value)
        for labels, value in metric_values(gateway.url, "das_gateway_key_inflight_samples")
    )
    assert held[holder] == 0


def wait_for_status(status: Callable[[], int], want: int) -> None:
    for _ in range(200):
        if status() == want:
            return
    raise AssertionError(f"never answered {want}")


def test_the_key_budget_and_the_samples_a_body_asks_for() -> None:
    budget = KeyBudget(4)
    release = budget.acquire("key-0", 3)
    with pytest.raises(Overloaded, match="3 of its 4"):
        budget.acquire("key-0", 2)
    other = budget.acquire("key-1", 4)
    with pytest.raises(InvalidRequest, match="at most 4"):
        budget.acquire("key-2", 5)
    release()
    release()  # idempotent: gives back once
    assert budget.inflight == {"key-1": 4}
    budget.acquire("key-0", 4)()
    other()
    assert budget.inflight == {}
    unlimited = KeyBudget(None)
    unlimited.acquire("key-0", 10**6)()
    assert unlimited.inflight == {}
    with pytest.raises(ValueError):
        KeyBudget(0)
    for path, body, samples in (
        ("/v1/completions", {"prompt": "x", "n": 3}, 3),
        ("/v1/completions", {"prompt": ["x", "y"], "n": 2}, 4),
        ("/v1/completions", {"prompt": [1, 2, 3]}, 1),
        ("/v1/completions", {"prompt": [[1], [2], [3]], "n": True}, 3),
        ("/v1/chat/completions", {"messages": [], "n": 5}, 5),
        ("/generate", {"text": ["a", "b"], "sampling_params": {"n": 3}}, 6),
        ("/generate", {"input_ids": [[1], [2]]}, 2),
        ("/inference/v1/generate", {"token_ids": [1], "sampling_params": {"n": 7}}, 7),
        ("/inference/v1/generate", {"token_ids": [1], "sampling_params": "n"}, 1),
    ):
        assert requested_samples(path, body) == samples, (path, body)


def test_health_answers_while_a_long_request_runs(serve: Callable[..., Server]) -> None:
    """No step delay: the fake worker's passes alone would hold the event loop; between
    passes it yields, so /health (and /get_server_info) answer while the request runs."""
    server = serve(speculation=False)
    body = {"prompt": "x", "n": 32, "max_tokens": 32_000, "ignore_eos": True}
    outcome: dict[str, int] = {}

    def run() -> None:
        response = httpx.post(
            server.url + "/v1/completions", json=body, headers={"x-request-id": "long"},
            timeout=120,
        )  # fmt: skip
        outcome["status"] = response.status_code

    thread = threading.Thread(target=run)
    thread.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:

            def running() -> bool:
                return bool(http.get("/get_server_info").json()["running_requests"])

            while not running():
                assert thread.is_alive()
            answered = 0  # health checks answered with the request running before and after
            while answered < 5 and thread.is_alive():
                before = running()
                assert http.get("/health").status_code == 200
                answered += before and running()
            # At least one answer came between two passes of the running request (how many
            # depends on the machine's speed; the request may well end before five).
            assert answered >= 1, outcome
            http.post("/abort_request", json={"rid": "long"})
    finally:
        thread.join(timeout=60)
    assert outcome["status"] == 200


def test_a_stream_never_iterated_releases_its_admission() -> None:
    """A client that leaves between a stream's first delta and its first chunk: the stream is
    never iterated (no finally runs), yet its samples are released once it is collected."""
    import asyncio
    import gc

    from drafter import DrafterConfig
    from service.entrypoints.generation import Generation, Prompt
    from service.errors import Overloaded
    from service.fake_worker import FakeWorker
    from service.history_store import HistoryStore
    from service.metrics import Metrics
    from service.worker import SamplingParams

    async def main() -> None:
        metrics = Metrics()
        worker = FakeWorker(HistoryStore(DrafterConfig(), metrics, "w"), step_delay_s=0.01)
        generation = Generation(worker, metrics, "w", Limits(1000, max_inflight_samples=4))
        params = SamplingParams(n=4, max_tokens=8)
        stream = await generation.stream(
            "left", [Prompt([1, 2, 3], "")], params, None, lambda p, d: "", None
        )
        assert generation.inflight_samples == 4
        with pytest.raises(Overloaded):
            await generation.run_all("next", [Prompt([1], "")], SamplingParams(), None)
        del stream
        gc.collect()
        assert generation.inflight_samples == 0
        (samples,) = await generation.run_all("next", [Prompt([1], "")], SamplingParams(), None)
        assert len(samples) == 1 and generation.inflight_samples == 0
        await worker.close()

    asyncio.run(main())
