"""`das trace` and `das bench rollout` end to end through main(argv), on the tiny random model."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench import cli as bench_cli
from bench.rollout import DEFAULT_MODES, RolloutConfig
from drafter.traces import read_trace
from service.cli import main
from service.engine import models

TINY = ["--model", "tiny-random", "--samples", "2", "--epochs", "2", "--max-tokens", "16"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # The machine has two cores and is shared: keep one free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_flag_defaults_are_the_benchmark_s() -> None:
    # One definition: bench/cli.py's defaults are RolloutConfig's, whose model is the engine's.
    parser = bench_cli.build_parser("das")
    for command in (["trace", "--out", "t.jsonl"], ["rollout"]):
        args = parser.parse_args(command)
        config = bench_cli._rollout_config(args, RolloutConfig().modes, RolloutConfig().cost)
        assert config == RolloutConfig()
    rollout = parser.parse_args(["rollout"])
    assert rollout.modes == DEFAULT_MODES and rollout.cost == "calibrate"
    assert RolloutConfig().model == models.SMOLLM2


def test_without_a_checkout_s_bench_the_commands_exit_1_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # An installed wheel carries drafter and service only: `import bench` fails.
    monkeypatch.setitem(sys.modules, "bench", None)
    monkeypatch.setitem(sys.modules, "bench.cli", None)
    for argv, command in (
        (["trace", "--out", "t.jsonl"], "das trace"),
        (["bench", "rollout", "--help"], "das bench rollout"),
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert err.startswith(f"das: error: `{command}` runs bench/ of a repository checkout")
        assert f"python -m bench.cli {command.split()[-1]}" in err


def test_help_comes_from_the_benchmark_s_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "rollout", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: das bench rollout")
    assert "--cost-model COST_MODEL, --cost COST_MODEL" in out and "h100-7b" in out


def test_trace_then_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trace.jsonl"
    argv = ["trace", *TINY, "--prompts", "math:2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    records = read_trace(out)
    tokens = sum(len(record.output) for record in records)  # the sampler's, not a fixed count
    assert printed.startswith(f"wrote 8 rollouts (2 prompts x 2 samples x 2 epochs, {tokens} ")
    assert len(records) == 8
    assert {record.epoch for record in records} == {0, 1}
    assert {record.group for record in records} == {"prompt-0", "prompt-1"}
    assert main(["simulate", "--trace", str(out), "--policy", "das", "--no-progress"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("policy das | trace |")
    assert [line.split()[0] for line in table[2:5]] == ["0", "1", "all"]


def test_trace_with_a_policy_writes_the_same_rollouts(tmp_path: Path) -> None:
    plain, speculated = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    base = ["trace", *TINY, "--prompts", "code:2", "--seed", "3", "--no-progress"]
    assert main([*base, "--out", str(plain)]) == 0
    assert main([*base, "--out", str(speculated), "--policy", "fixed:4"]) == 0
    assert read_trace(plain) == read_trace(speculated)


def test_bench_rollout_writes_json_plot_and_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 + 2?\nName three colours.\n")
    json_out, plot, trace = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "t.jsonl"
    argv = ["bench", "rollout", *TINY, "--prompts", str(prompts), "--no-progress"]
    argv += ["--json", str(json_out), "--trace", str(trace), "--threads", "1"]
    if _has_matplotlib():
        argv += ["--plot", str(plot)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("model tiny-random | prompts")
    assert lines[1].startswith("cost model for das: ")
    rows = [line.split() for line in lines[3:9]]
    assert [(row[0], row[1], row[-1]) for row in rows] == [
        (mode, epoch, "0") for mode in ("none", "fixed:8", "das") for epoch in ("0", "1")
    ]
    data = json.loads(json_out.read_text())
    assert set(data) == {"config", "machine", "definitions", "runs", "summary"}
    assert data["config"]["samples"] == 2
    assert data["config"]["modes"] == ["none", "fixed:8", "das"]
    assert data["config"]["cost"] == "calibrate"
    assert len(data["runs"]) == 6
    assert all(run["mismatched_rollouts"] == 0 for run in data["runs"])
    assert len(read_trace(trace)) == 2 * 2 * 2
    if _has_matplotlib():
        assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_rollout_modes_and_cost_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_out = tmp_path / "b.json"
    argv = ["bench", "rollout", *TINY, "--prompts", "math:2", "--modes", "das,none"]
    argv += ["--cost", "smollm2-cpu", "--temperature", "0", "--max-batch", "2"]
    assert main([*argv, "--json", str(json_out), "--no-progress"]) == 0
    data = json.loads(json_out.read_text())
    assert data["config"]["modes"] == ["none", "das"]  # none first: the reference
    assert data["config"]["max_batch"] == 2
    assert data["config"]["temperature"] == 0.0
    assert data["config"]["cost_model"]["source"] == "smollm2-cpu"
    assert [run["mode"] for run in data["runs"]] == ["none", "none", "das", "das"]
    # With 2 slots for 4 rollouts the batch never holds more than 2.
    assert max(n for run in data["runs"] for _, n in run["batch_size_over_time"]) == 2


def test_bench_rollout_tree_drafts_and_live_siblings(tmp_path: Path) -> None:
    json_out = tmp_path / "t.json"
    argv = ["bench", "rollout", *TINY, "--prompts", "math:2", "--modes", "none,fixed:4"]
    argv += ["--temperature", "0", "--tree-drafts", "--live-siblings", "--json", str(json_out)]
    assert main([*argv, "--no-progress"]) == 0
    data = json.loads(json_out.read_text())
    assert data["config"]["tree_drafts"] is True and data["config"]["live_siblings"] is True
    fixed = [run for run in data["runs"] if run["mode"] == "fixed:4"]
    assert sum(run["accepted"] for run in fixed) > 0
    assert all(run["mismatches"] == [] for run in data["runs"])  # no rollout differs


def test_bench_rollout_takes_a_cost_model_in_seconds(tmp_path: Path) -> None:
    json_out = tmp_path / "b.json"
    argv = ["bench", "rollout", *TINY, "--prompts", "math:1", "--samples", "1", "--epochs", "1"]
    argv += ["--modes", "das", "--cost-model", "0.01,0.0005", "--json", str(json_out)]
    assert main([*argv, "--no-progress"]) == 0
    cost = json.loads(json_out.read_text())["config"]["cost_model"]
    assert (cost["source"], cost["c_base"], cost["c_tok"]) == ("0.01,0.0005", 0.01, 0.0005)


@pytest.mark.parametrize(
    "argv",
    [
        ["bench"],
        ["bench", "rollout", "--samples", "0"],
        ["bench", "rollout", "--epochs", "x"],
        ["bench", "rollout", "--max-tokens", "-1"],
        ["bench", "rollout", "--temperature", "2.5"],
        ["bench", "rollout", "--modes", "none,bogus"],
        ["bench", "rollout", "--modes", "none,none"],
        ["bench", "rollout", "--modes", "fixed:0"],
        ["bench", "rollout", "--prompts", "math:0"],
        ["bench", "rollout", "--cost", "guess"],
        ["bench", "rollout", "--cost-model", "h100"],
        ["bench", "rollout", "--cost-model", "0.01,-1"],
        ["bench", "rollout", "--cost-model", "0.01"],
        ["bench", "rollout", "--max-batch", "0"],
        ["bench", "rollout", "--seed", "-2"],
        ["trace"],
        ["trace", "--out", "t.jsonl", "--policy", "fixed:x"],
        ["trace", "--out", "t.jsonl", "--prompts", "code:y"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_a_bad_prompt_file_exits_1_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    argv = ["trace", *TINY, "--prompts", str(prompts), "--out", str(tmp_path / "t.jsonl")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("das: error: bad prompts: ")
    assert "p.jsonl:2: prompt must be a non-empty string" in err
    assert not (tmp_path / "t.jsonl").exists()


def test_an_unknown_model_or_prompt_set_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "rollout", "--model", str(tmp_path / "nope"), "--prompts", "math:2"]
    assert main(argv) == 1
    assert "cannot load model" in capsys.readouterr().err
    argv = ["bench", "rollout", *TINY, "--prompts", str(tmp_path / "missing.txt")]
    assert main(argv) == 1
    assert "unknown prompt set" in capsys.readouterr().err


def test_an_unwritable_output_exits_1_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "rollout", *TINY, "--json", str(tmp_path / "no" / "dir" / "b.json")]
    assert main(argv) == 1
    assert "no such directory" in capsys.readouterr().err


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
