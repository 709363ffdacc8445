"""`das worker --backend sglang`: the SGLang command line, its environment, and what is refused
(no sglang needed: the launcher only builds a command and execs it)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from drafter.cost import H100_7B
from drafter.das import DasPolicy
from drafter.policy import RequestView
from service.cli import main
from service.settings import Settings
from service.sglang_plugin import ENABLE_ENV
from service.sglang_plugin import launch as launch_module
from service.sglang_plugin.config import (
    DEFAULT_DRAFT_WIDTH,
    SGLangConfigError,
    build_speculator,
    settings_from_env,
    sglang_cost_model,
)
from service.sglang_plugin.launch import sglang_command, sglang_env


def settings(**overrides: Any) -> Settings:
    return Settings(
        **{"backend": "sglang", "model": "/models/m", "cost_model": "h100-7b", **overrides}
    )


def test_the_command_runs_ngram_with_our_flags_and_then_the_callers() -> None:
    command = sglang_command(settings(port=30000, max_batch=64), ["--tp", "2"], python="py")
    assert command == [
        "py", "-m", "sglang.launch_server",
        "--model-path", "/models/m",
        "--host", "127.0.0.1",
        "--port", "30000",
        "--max-running-requests", "64",
        "--speculative-algorithm", "NGRAM",
        "--speculative-num-draft-tokens", str(DEFAULT_DRAFT_WIDTH),
        "--speculative-ngram-capacity", str(launch_module.NGRAM_CAPACITY),
        "--tp", "2",
    ]  # fmt: skip


@pytest.mark.parametrize("off", [{"speculation": False}, {"spec_policy": "none"}])
def test_without_speculation_it_is_plain_sglang(off: dict[str, Any]) -> None:
    # The baseline: no NGRAM, so the plugin never engages; no cost model is needed either.
    command = sglang_command(settings(cost_model="calibrate", **off), [], python="py")
    assert not any(arg.startswith("--speculative") for arg in command)
    assert "--max-running-requests" in command
    with pytest.raises(ValueError, match="choose one"):
        sglang_command(settings(**off), ["--speculative-algorithm", "NGRAM"])


def test_the_served_name_and_api_key_go_to_sglang() -> None:
    command = sglang_command(settings(served_model_name="policy", api_key="k"), [])
    assert command[-4:] == ["--served-model-name", "policy", "--api-key", "k"]


@pytest.mark.parametrize(
    "extra", [["--speculative-algorithm", "EAGLE"], ["--speculative-algorithm=eagle3"]]
)
def test_another_speculative_algorithm_is_refused(extra: list[str]) -> None:
    with pytest.raises(ValueError, match="NGRAM only"):
        sglang_command(settings(), extra)


@pytest.mark.parametrize("cost", ["calibrate", "smollm2-cpu"])
def test_a_gpu_worker_never_plans_with_this_cpus_constants_or_a_calibration(cost: str) -> None:
    with pytest.raises(SGLangConfigError, match="SGLang worker"):
        sglang_command(settings(cost_model=cost), [])
    with pytest.raises(SGLangConfigError):
        sglang_cost_model(cost)
    assert sglang_cost_model("0.01,0.00002").c_tok == 0.00002


def test_the_environment_carries_every_setting_and_switches_the_plugin_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    launched = settings(redis_url="redis://r:6379/0", history_window=2, port=30000)
    env = sglang_env(launched, {"PATH": "/bin"})
    assert env[ENABLE_ENV] == "1"
    assert env["PATH"] == "/bin"
    assert env["DAS_REDIS_URL"] == "redis://r:6379/0"
    assert "DAS_API_KEY" not in env
    # What SGLang's scheduler process reads back (config.settings_from_env) is what we had.
    for key in [k for k in os.environ if k.startswith("DAS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("DAS_") and key != ENABLE_ENV:
            monkeypatch.setenv(key, value)
    assert settings_from_env() == launched


def test_sglangs_plugin_filter_is_extended_not_replaced() -> None:
    assert sglang_env(settings(), {"SGLANG_PLUGINS": "other"})["SGLANG_PLUGINS"] == "other,das"
    assert sglang_env(settings(), {"SGLANG_PLUGINS": "das"})["SGLANG_PLUGINS"] == "das"
    assert "SGLANG_PLUGINS" not in sglang_env(settings(), {})


def test_das_worker_backend_sglang_execs_sglang(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))

    monkeypatch.setattr(launch_module.os, "execve", execve)
    argv = ["worker", "--backend", "sglang", "--model", "/m", "--cost-model", "h100-7b"]
    main([*argv, "--", "--tp", "2", "--mem-fraction-static", "0.8"])
    ((path, command, env),) = calls
    assert command[0] == path
    assert command[command.index("--model-path") + 1] == "/m"
    assert command[-4:] == ["--tp", "2", "--mem-fraction-static", "0.8"]
    assert env["DAS_BACKEND"] == "sglang" and env[ENABLE_ENV] == "1"


def test_bad_launches_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["worker", "--backend", "sglang", "--model", "/m"],  # calibrate: the default
        ["serve", "--backend", "sglang", "--model", "/m", "--cost-model", "h100-7b"],
        ["worker", "--model", "fake", "--", "--tp", "2"],  # -- is for sglang's arguments only
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert "explicit one" in errors and "das worker" in errors and "--tp 2" in errors


def test_the_default_width_covers_the_das_budgets_of_a_large_batch() -> None:
    """config.DEFAULT_DRAFT_WIDTH's derivation: the das-rate budgets on the h100-7b cost model
    (das's cut prices a token of chance rate ** n the same way)."""

    def budgets(batch: int, rate: float) -> list[int]:
        from drafter.das import DasConfig

        policy = DasPolicy(H100_7B, DasConfig(rule="rate", prior_rate=rate))
        return policy.budgets([RequestView(f"g{i % 8}") for i in range(batch)])

    cap = DEFAULT_DRAFT_WIDTH - 1
    assert max(budgets(4, 0.5)) <= cap  # at 0.5 per token, every batch of 4 or more...
    assert max(budgets(32, 0.7)) <= cap  # ...and at 0.7, every batch of 32 or more
    assert max(budgets(1, 0.5)) > cap  # while the drained tail is capped
    assert max(budgets(1, 0.7)) > cap
    speculator = build_speculator(settings(), DEFAULT_DRAFT_WIDTH)
    assert speculator.max_draft == DEFAULT_DRAFT_WIDTH - 1
    assert speculator.history.config.tree_drafts
