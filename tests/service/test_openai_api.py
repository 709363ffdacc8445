"""The OpenAI surface against a real uvicorn server: official client and plain httpx."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from tests.service.conftest import Server


def oai(server: Server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=10)


def events(response: httpx.Response) -> list[Any]:
    lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models(worker: Server) -> None:
    assert [m.id for m in oai(worker).models.list()] == ["fake"]


def test_completion_with_the_official_client(worker: Server) -> None:
    client = oai(worker)
    out = client.completions.create(
        model="fake", prompt="Solve x + 1 = 3.", max_tokens=24, n=2, seed=5, logprobs=2,
        extra_body={"return_token_ids": True, "top_k": 50},
    )  # fmt: skip
    assert len(out.choices) == 2 and out.usage is not None
    assert out.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in out.choices)  # type: ignore[index]
    for choice in out.choices:
        extra = choice.model_extra or {}
        assert len(extra["token_ids"]) <= 24
        assert extra["prompt_token_ids"] == list(b"Solve x + 1 = 3.")
        assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
        assert len(choice.logprobs.token_logprobs) == len(extra["token_ids"])
        spec = extra["spec"]
        assert spec["forward_passes"] + spec["accepted_tokens"] == len(extra["token_ids"])
    again = client.completions.create(
        model="fake", prompt="Solve x + 1 = 3.", max_tokens=24, n=2, seed=5
    )
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    assert (out.model_extra or {})["spec"]["forward_passes"] > 0


def test_completion_prompt_forms(client: httpx.Client) -> None:
    text = client.post("/v1/completions", json={"model": "fake", "prompt": "abc", "seed": 1})
    ids = client.post("/v1/completions", json={"model": "fake", "prompt": [97, 98, 99], "seed": 1})
    assert text.status_code == ids.status_code == 200
    assert text.json()["choices"][0]["text"] == ids.json()["choices"][0]["text"]
    many = client.post(
        "/v1/completions",
        json={"prompt": [[97, 98], [99, 100, 101]], "n": 2, "max_tokens": 3, "seed": 1},
    ).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["usage"]["prompt_tokens"] == 5
    strings = client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).json()
    assert len(strings["choices"]) == 2


def test_prompt_group_and_session_header_name_the_group(client: httpx.Client) -> None:
    body = {"model": "fake", "prompt": "group me", "max_tokens": 4, "prompt_group": "explicit-g"}
    assert client.post("/v1/completions", json=body).status_code == 200
    del body["prompt_group"]
    headers = {"X-Session-ID": "session-g"}
    assert client.post("/v1/completions", json=body, headers=headers).status_code == 200
    info = client.get("/get_server_info").json()
    assert info["history_groups"] >= 2


def test_completion_stream(worker: Server) -> None:
    client = oai(worker)
    chunks = list(
        client.completions.create(
            model="fake", prompt="stream me", max_tokens=40, seed=3, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = client.completions.create(model="fake", prompt="stream me", max_tokens=40, seed=3)
    assert text == whole.choices[0].text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and (finals[0].choices[0].model_extra or {})["spec"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    ids = [t for c in chunks if c.choices for t in (c.choices[0].model_extra or {})["token_ids"]]
    assert len(ids) == usage.completion_tokens


def test_chat_completion_and_stream(worker: Server) -> None:
    client = oai(worker)
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(
        model="fake", messages=messages, max_tokens=30, seed=11, logprobs=True, top_logprobs=2,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert len(choice.logprobs.content[0].top_logprobs) == 2
    assert (out.model_extra or {})["prompt_token_ids"]
    streamed = client.chat.completions.create(
        model="fake", messages=messages, max_tokens=30, seed=11, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
    assert "".join(pieces) == choice.message.content


def test_chat_with_content_parts(client: httpx.Client) -> None:
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "max_completion_tokens": 5,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 5
    body["messages"] = [{"role": "user", "content": [{"type": "image_url"}]}]
    assert client.post("/v1/chat/completions", json=body).status_code == 400


def test_stream_with_several_prompts_and_samples(client: httpx.Client) -> None:
    response = client.post(
        "/v1/completions",
        json={"prompt": ["one", "two"], "n": 2, "max_tokens": 6, "stream": True, "seed": 2},
    )
    finished = {
        c["choices"][0]["index"] for c in events(response) if c["choices"][0]["finish_reason"]
    }
    assert finished == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "fake", "prompt": "x", "echo": True}, 400, "echo"),
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "fake", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "fake", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "fake", "prompt": "x", "temperature": 9}, 400, "temperature"),
        ({"model": "fake", "prompt": "x", "n": 0}, 400, "n"),
        ({"model": "fake", "prompt": "x", "logprobs": 50}, 400, "logprobs"),
        ({"model": "fake", "prompt": ""}, 400, "prompt"),
        ({"model": "fake", "prompt": []}, 400, "prompt"),
        ({"model": "fake", "prompt": [1, 100000]}, 400, "prompt"),
        ({"model": "fake", "prompt": "x", "presence_penalty": 1.0}, 400, "presence_penalty"),
        ({"model": "fake", "prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"model": "fake"}, 400, "prompt"),
        ({"model": "fake", "prompt": "x", "stream": True, "n": 0}, 400, "n"),
    ],
)
def test_completion_errors_are_openai_shaped(
    client: httpx.Client, body: dict[str, Any], status: int, param: str | None
) -> None:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    assert error["param"] == param


def test_bad_json_unknown_route_and_method(client: httpx.Client) -> None:
    response = client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == 400
    missing = client.post("/v1/nothing-here", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    wrong = client.get("/v1/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == 405


def test_chat_errors(worker: Server, client: httpx.Client) -> None:
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    body = {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    assert client.post("/v1/chat/completions", json=body).status_code == 400
    with pytest.raises(openai.NotFoundError):
        oai(worker).chat.completions.create(
            model="other", messages=[{"role": "user", "content": "x"}]
        )


def test_api_key(serve: Callable[..., Server]) -> None:
    server = serve(api_key="sekret")
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        for method, path in [
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("POST", "/generate"),
            ("POST", "/inference/v1/generate"),
            ("POST", "/abort_request"),
            ("POST", "/pause_generation"),
            ("POST", "/continue_generation"),
            ("POST", "/update_weights_from_disk"),
            ("GET", "/get_weight_version"),
            ("POST", "/flush_cache"),
            ("GET", "/health_generate"),
            ("GET", "/get_server_info"),
        ]:
            response = http.request(method, path, json={})
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == 401
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = http.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        assert right.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        oai(server, "nope").models.list()
    out = oai(server, "sekret").completions.create(model="fake", prompt="x", max_tokens=2)
    assert out.choices[0].text is not None


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_metrics_count_requests_tokens_and_speculation(client: httpx.Client) -> None:
    for _ in range(3):
        client.post("/v1/completions", json={"prompt": "metrics", "max_tokens": 50, "seed": 1})
    client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    found = samples(client.get("/metrics").text)
    requests = {(s["endpoint"], s["status"]): v for s, v in found["das_requests_total"]}
    assert requests[("/v1/completions", "200")] >= 3
    errors = {(s["endpoint"], s["status"]): v for s, v in found["das_request_errors_total"]}
    assert errors[("/v1/completions", "404")] >= 1
    for name in (
        "das_prompt_tokens_total",
        "das_generated_tokens_total",
        "das_forward_passes_total",
        "das_drafted_tokens_total",
        "das_accepted_tokens_total",
        "das_accepted_tokens_per_forward_count",
        "das_generation_length_tokens_count",
        "das_history_tokens",
        "das_history_groups",
    ):
        assert sum(v for _, v in found[name]) > 0, name
        assert all(labels["worker"] == "shared" for labels, _ in found[name])
    for name in (
        "das_running_requests",
        "das_queued_requests",
        "das_redis_errors_total",
        "das_buffered_rollouts",
        "das_policy_version",
    ):
        assert name in found, name
