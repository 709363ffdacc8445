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

from service.limits import FAKE_MAX_MODEL_LEN, MAX_CHARS_PER_TOKEN, Fields, Limits
from service.worker_app import create_app
from tests.service.conftest import Server, free_port, start_server, worker_settings

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


def test_health_answers_while_a_long_request_runs(serve: Callable[..., Server]) -> None:
    """No step delay: the fake worker's passes alone would hold the event loop; between
    passes it yields, so /health (and /get_server_info) answer while the request runs."""
    server = serve(speculation=False)
    body = {"prompt": "x", "n": 16, "max_tokens": 20_000, "ignore_eos": True}
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
            while http.get("/get_server_info").json()["running_requests"] == 0:
                assert thread.is_alive()
            for _ in range(5):
                assert http.get("/health").status_code == 200
            assert http.get("/get_server_info").json()["running_requests"] == 1  # still running
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
