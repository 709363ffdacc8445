"""`das worker --backend vllm ... -- FLAGS`: the flags after -- reach VllmWorker (no vLLM
needed: the worker is only built, never started)."""

from __future__ import annotations

from typing import Any

import pytest

from service import commands
from service.history_store import HistoryStore
from service.metrics import Metrics
from service.settings import Settings
from service.vllm_backend.worker import VllmWorker


def test_flags_after_the_separator_reach_the_vllm_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    built: dict[str, Any] = {}

    def create_app(settings: Settings, factory: Any = None) -> str:
        built["settings"], built["factory"] = settings, factory
        return "app"

    monkeypatch.setattr("service.worker_app.create_app", create_app)
    monkeypatch.setattr(commands, "_serve", lambda app, settings: None)
    argv = ["--backend", "vllm", "--model", "m", "--", "--max-num-batched-tokens", "4096"]
    assert commands.worker(argv) == 0
    settings = built["settings"]
    worker = built["factory"](settings, _store(), Metrics())
    assert isinstance(worker, VllmWorker)
    assert worker._engine_args == ["--max-num-batched-tokens", "4096"]


def test_engine_workers_still_refuse_extra_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        commands.worker(["--model", "fake", "--", "--max-num-batched-tokens", "4096"])
    assert "unrecognized arguments" in capsys.readouterr().err


def _store() -> HistoryStore:
    from drafter import DrafterConfig

    return HistoryStore(DrafterConfig(), Metrics(), "w", None)
