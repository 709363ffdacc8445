from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from service.commands import (
    add_gateway_parser,
    add_serve_parser,
    add_worker_parser,
    flag_name,
    settings_from,
)
from service.commands import worker as worker_main
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


def _flags(command: str) -> dict[str, list[str]]:
    """dest -> option strings of one command's parser (help left out)."""
    parser = argparse.ArgumentParser(prog="das")
    sub = parser.add_subparsers(dest="command", required=True)
    adders = {"serve": add_serve_parser, "worker": add_worker_parser, "gateway": add_gateway_parser}
    command_parser = adders[command](sub)
    return {
        action.dest: list(action.option_strings)
        for action in command_parser._actions
        if action.option_strings and action.dest != "help"  # flags: positionals are not
    }


def test_every_setting_is_one_flag_and_every_flag_a_setting() -> None:
    serve, worker, gateway = _flags("serve"), _flags("worker"), _flags("gateway")
    assert serve == worker  # one definition: serve is a worker with the API in one process
    for flags in (serve, gateway):
        assert set(flags) <= set(Settings.model_fields)
        assert all(len(options) == 1 for options in flags.values())
    assert set(serve) | set(gateway) == set(Settings.model_fields)
    common = set(serve) & set(gateway)
    assert common == {
        "host", "port", "api_key", "client_api_keys", "admin_api_key", "log_level",
        "max_body_bytes",
    }  # fmt: skip
    for name in common:
        assert serve[name] == gateway[name] == [flag_name(name)]
    options = [options[0] for options in (*serve.values(), *gateway.values())]
    assert len(set(options)) == len(Settings.model_fields)  # no two settings share a flag


def test_the_flags_keep_their_names() -> None:
    names = {name: flag_name(name) for name in Settings.model_fields}
    assert {
        "speculation": "--no-speculation",
        "deterministic": "--deterministic",
        "tree_drafts": "--tree-drafts",
        "fake_step_delay_s": "--fake-step-delay",
        "worker_urls": "--worker",
        "routing_load_factor": "--load-factor",
        "health_interval_s": "--health-interval",
        "served_model_name": "--served-model-name",
        "cost_model": "--cost-model",
        "redis_timeout_s": "--redis-timeout",
    }.items() <= names.items()


def test_help_is_the_field_description(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in ("cost_model", "max_batch", "redis_url", "speculation"):
        description = Settings.model_fields[name].description
        assert description is not None and " ".join(description.split()) in out
    assert "(default 16; env DAS_MAX_BATCH)" in out


def test_every_setting_is_exercised_through_its_flag() -> None:
    # A value unlike the default for each field, given on the command line.
    values = {
        "host": "0.0.0.0", "port": "9", "api_key": "k", "log_level": "debug", "model": "fake",
        "admin_api_key": "a-k", "worker_admin_api_key": "wa-k", "max_body_bytes": "4096",
        "max_prompts_per_request": "8", "max_inflight_samples": "64", "max_n": "4",
        "max_stop_strings": "2", "max_stop_chars": "9", "catch_up_max_backoff_s": "5",
        "client_api_keys": "c-k", "max_inflight_samples_per_key": "32",
        "history_close_timeout_s": "1.5", "control_timeout_s": "3",
        "backend": "sglang",
        "served_model_name": "m", "device": "cuda:1", "dtype": "bfloat16",
        "spec_policy": "fixed:3", "cost_model": "h100-7b", "spec_budget": "2",
        "max_batch": "3", "max_model_len": "99", "worker_id": "w", "fake_step_delay_s": "0.5",
        "redis_url": "redis://r:1/0", "history_window": "2", "history_max_groups": "77",
        "history_max_rollouts_per_group": "5", "history_buffer_size": "6",
        "history_extend_threads": "0",
        "history_sync_interval_s": "0.25", "redis_timeout_s": "0.125", "worker_api_key": "w-k",
        "routing_load_factor": "0.5", "routing_vnodes": "8", "health_interval_s": "2.5",
        "health_failures": "4", "upstream_timeout_s": "30",
    }  # fmt: skip
    defaults = Settings()
    for command in ("serve", "gateway"):
        argv = [command]
        for name in _flags(command):
            if name in (
                "speculation",
                "deterministic",
                "history_live_siblings",
                "history_other_groups",
                "tree_drafts",
            ):
                argv.append(flag_name(name))
            elif name == "worker_urls":
                argv += ["--worker", "http://a:1/", "--worker", "http://b:2"]
            elif name == "sglang_worker_urls":
                argv += ["--sglang-worker", "http://c:3/"]
            else:
                argv += [flag_name(name), values[name]]
        settings = settings_from(parse(argv))
        for name in _flags(command):
            assert getattr(settings, name) != getattr(defaults, name), name
    assert settings_from(parse(["gateway", "--worker", "http://a:1/"])).worker_urls == [
        "http://a:1"
    ]


def test_environment_fills_in_below_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAS_COST_MODEL", "smollm2-cpu")
    monkeypatch.setenv("DAS_MAX_BATCH", "7")
    assert settings_from(parse(["serve"])).cost_model == "smollm2-cpu"
    settings = settings_from(parse(["serve", "--cost-model", "0.01,0.002"]))
    assert (settings.cost_model, settings.max_batch) == ("0.01,0.002", 7)
    assert Settings().cost_model == "smollm2-cpu"
    monkeypatch.delenv("DAS_COST_MODEL")
    assert Settings().cost_model == "calibrate"  # the default: the worker times its own step


@pytest.mark.parametrize("value", ["calibrate", "smollm2-cpu", "h100-7b", " H100-7B ", "1e-2,3e-5"])
def test_cost_models_the_setting_takes(value: str) -> None:
    assert Settings(cost_model=value).cost_model == value.strip().lower()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--cost-model", "a100"], "argument --cost-model (or DAS_COST_MODEL): unknown"),
        (["worker", "--cost-model", "0.01"], "unknown cost model '0.01'"),
        (["worker", "--cost-model", "0,0.1"], "c_base must be a positive number of seconds"),
        (["serve", "--port", "70000"], "argument --port (or DAS_PORT): Input should be less"),
        (["serve", "--spec-policy", "often"], "argument --spec-policy (or DAS_SPEC_POLICY)"),
        (["gateway", "--health-interval", "0", "--worker", "http://a:1"], "--health-interval"),
        (["serve", "--port", "x"], "argument --port: invalid int value: 'x'"),
        (["serve", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["gateway", "--model", "fake"], "unrecognized arguments: --model fake"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        args = parse(argv)
        args.handler(args)  # validates before serving anything
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"das {argv[0]}: error: " in err or "das: error: " in err
    assert message in err


def test_a_bad_environment_value_exits_2_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DAS_COST_MODEL", "guess")
    with pytest.raises(SystemExit) as exit_info:
        worker_main(["--model", "fake"])
    assert exit_info.value.code == 2
    assert "(or DAS_COST_MODEL): unknown cost model 'guess'" in capsys.readouterr().err
