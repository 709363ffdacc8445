from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from service.commands import (
    add_gateway_parser,
    add_serve_parser,
    add_worker_parser,
    settings_from,
)
from service.settings import Settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="das")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_worker_parser(sub)
    add_gateway_parser(sub)
    return parser.parse_args(argv)


def test_defaults() -> None:
    settings = Settings()
    assert settings.model == "smollm2-135m" and settings.model_name == "smollm2-135m"
    assert settings.device == "cpu" and settings.dtype == "float32"
    assert settings.spec_policy == "das" and settings.speculation_policy == "das"
    assert settings.max_batch == 16 and settings.max_model_len == 1024
    assert settings.speculation and settings.redis_url is None and settings.api_key is None
    assert settings.worker_name == "127.0.0.1:8000"


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAS_PORT", "9001")
    monkeypatch.setenv("DAS_API_KEY", "from-env")
    monkeypatch.setenv("DAS_WORKER_URLS", '["http://a:1/", "http://b:2"]')
    assert Settings().port == 9001 and Settings().worker_urls == ["http://a:1", "http://b:2"]
    args = parse(["serve", "--model", "fake", "--port", "9100", "--no-speculation",
                  "--redis-url", "redis://r:1/0"])  # fmt: skip
    settings = settings_from(args)
    assert settings.port == 9100 and settings.api_key == "from-env"  # flag wins, env fills in
    assert settings.speculation is False and settings.redis_url == "redis://r:1/0"
    assert args.handler.__name__ == "run_worker"


def test_gateway_flags() -> None:
    args = parse(["gateway", "--worker", "http://a:1", "--worker", "http://b:2", "--api-key", "k"])
    settings = settings_from(args)
    assert settings.worker_urls == ["http://a:1", "http://b:2"] and settings.api_key == "k"
    assert args.handler.__name__ == "run_gateway"
    worker = settings_from(parse(["worker", "--device", "cuda", "--worker-id", "w7"]))
    assert worker.device == "cuda" and worker.worker_name == "w7"


def test_invalid_settings() -> None:
    with pytest.raises(ValidationError):
        Settings(port=-1)
    with pytest.raises(ValidationError):
        Settings(spec_budget=1000)
    with pytest.raises(ValidationError):
        Settings(unknown_knob=1)  # type: ignore[call-arg]
