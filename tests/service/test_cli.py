from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from drafter.cost import H100_7B, SMOLLM2_CPU
from drafter.traces import TraceRecord, read_trace, write_trace
from service.cli import main

REPO = Path(__file__).resolve().parents[2]
EPOCH_FIELDS: dict[str, type | tuple[type, ...]] = {
    "epoch": (int, type(None)),
    "rollouts": int,
    "tokens": int,
    "forwards": int,
    "steps": int,
    "drafted": int,
    "accepted": int,
    "makespan_s": float,
    "baseline_s": float,
    "accepted_per_forward": float,
    "tokens_per_forward": float,
    "makespan_ratio": float,
}


@pytest.fixture
def small_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "trace.jsonl"
    argv = ["synth-trace", "--out", str(path), "--groups", "2", "--samples", "3"]
    assert main([*argv, "--epochs", "2", "--seed", "1"]) == 0
    capsys.readouterr()
    return path


def _check_epoch(report: object) -> None:
    assert isinstance(report, dict)
    assert set(report) == set(EPOCH_FIELDS)
    for key, kind in EPOCH_FIELDS.items():
        assert isinstance(report[key], kind), key
        assert not isinstance(report[key], bool), key


def test_synth_trace_writes_a_labelled_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.jsonl"
    assert main(["synth-trace", "--out", str(path), "--groups", "2", "--samples", "3"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out
    assert "2 groups x 3 samples x 6 epochs" in out
    trace = read_trace(path)
    assert len(trace) == 2 * 3 * 6
    assert all(record.synthetic for record in trace)


def test_synth_trace_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    assert main(["synth-trace", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert "8 groups x 8 samples x 6 epochs" in out
    assert "seed 0" in out
    assert len(read_trace(path)) == 8 * 8 * 6


def test_simulate_prints_a_table_and_writes_json(
    small_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "result.json"
    argv = ["simulate", "--trace", str(small_trace), "--policy", "fixed:4", "--json"]
    assert main([*argv, str(out_path), "--no-progress"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("policy fixed:4 | SYNTHETIC trace | cost model c_base 62.5 ms")
    assert table[1].split() == [
        "epoch",
        "rollouts",
        "tokens",
        "steps",
        "forwards",
        "acc/fwd",
        "tok/fwd",
        "makespan_s",
        "baseline_s",
        "ratio",
    ]
    assert [line.split()[0] for line in table[2:5]] == ["0", "1", "all"]
    data = json.loads(out_path.read_text())
    assert set(data) == {"synthetic", "policy", "cost_model", "drafter", "epochs", "total"}
    assert data["synthetic"] is True
    assert data["policy"] == "fixed:4"
    assert data["cost_model"] == {"c_base": SMOLLM2_CPU.c_base, "c_tok": SMOLLM2_CPU.c_tok}
    assert data["drafter"]["max_depth"] == 64
    assert [epoch["epoch"] for epoch in data["epochs"]] == [0, 1]
    for report in [*data["epochs"], data["total"]]:
        _check_epoch(report)
    assert data["total"]["rollouts"] == 12
    # The table shows the same figures as the JSON.
    assert table[3].split()[1:4] == [
        str(data["epochs"][1][key]) for key in ("rollouts", "tokens", "steps")
    ]


def test_simulate_defaults_to_das(
    small_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "result.json"
    assert main(["simulate", "--trace", str(small_trace), "--json", str(out_path)]) == 0
    assert capsys.readouterr().out.startswith("policy das |")
    data = json.loads(out_path.read_text())
    assert data["policy"] == "das"
    assert data["drafter"] == {
        "max_depth": 64,
        "window": 8,
        "max_rollouts_per_group": 64,
        "max_groups": 8192,
        "min_prob": 0.1,
        "tree_drafts": False,
        "live_siblings": True,
        "other_groups": False,
        "extend_threads": 1,
    }


def test_simulate_takes_cost_and_drafter_knobs(
    small_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "result.json"
    argv = ["simulate", "--trace", str(small_trace), "--policy", "none", "--c-base", "0.01"]
    argv += ["--c-tok", "0.001", "--max-depth", "16", "--window", "2", "--min-prob", "0.2"]
    assert main([*argv, "--tree-drafts", "--json", str(out_path), "--no-progress"]) == 0
    assert "tree drafts" in capsys.readouterr().out
    data = json.loads(out_path.read_text())
    assert data["cost_model"] == {"c_base": 0.01, "c_tok": 0.001}
    assert data["drafter"]["max_depth"] == 16
    assert data["drafter"]["window"] == 2
    assert data["drafter"]["min_prob"] == 0.2
    assert data["drafter"]["tree_drafts"] is True
    assert data["total"]["makespan_ratio"] == 1.0


@pytest.mark.parametrize(
    ("flags", "cost"),
    [
        (["--cost-model", "h100-7b"], {"c_base": H100_7B.c_base, "c_tok": H100_7B.c_tok}),
        (["--cost-model", "0.02,0.003"], {"c_base": 0.02, "c_tok": 0.003}),
        (
            ["--cost-model", "H100-7B", "--c-tok", "0.001"],
            {"c_base": H100_7B.c_base, "c_tok": 0.001},
        ),
        (["--c-base", "0.5"], {"c_base": 0.5, "c_tok": SMOLLM2_CPU.c_tok}),
    ],
)
def test_simulate_takes_a_cost_model_and_overrides_of_its_parts(
    small_trace: Path, tmp_path: Path, flags: list[str], cost: dict[str, float]
) -> None:
    out_path = tmp_path / "result.json"
    argv = ["simulate", "--trace", str(small_trace), "--json", str(out_path), "--no-progress"]
    assert main([*argv, *flags]) == 0
    assert json.loads(out_path.read_text())["cost_model"] == cost


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("calibrate", "calibrate times an engine's verify step"),
        ("a100", "unknown cost model 'a100'"),
        ("0.01,0", "c_tok must be a positive number of seconds"),
    ],
)
def test_simulate_refuses_a_bad_cost_model(
    small_trace: Path, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--trace", str(small_trace), "--cost-model", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --cost-model" in err and message in err


def test_simulate_prices_steps_by_a_bench_cost_curve(
    small_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    curve = [
        {"rows": 1, "c_base": 0.03, "c_tok": 0.004},
        {"rows": 4, "c_base": 0.05, "c_tok": 0.001},
    ]
    bench = {"config": {"cost_model": {"c_base": 0.04, "c_tok": 0.002, "curve": curve}}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    out_path = tmp_path / "runs.json"
    argv = ["simulate", "--trace", str(small_trace), "--policy", "none,das,das/line"]
    argv += ["--cost-curve", str(tmp_path / "bench.json"), "--json", str(out_path)]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "policy das/line | SYNTHETIC trace | steps priced by a cost curve (rows 1, 4)" in out
    runs = json.loads(out_path.read_text())["runs"]
    assert [run["priced_by_curve"] for run in runs] == [False, True, False]
    assert all(run["cost_curve"] == curve for run in runs)
    assert runs[0]["cost_model"] == {"c_base": 0.04, "c_tok": 0.002}  # the file's line
    assert runs[0]["total"]["makespan_ratio"] == pytest.approx(1.0)
    # A calibration without a curve, and das/line without one, are refused.
    (tmp_path / "line.json").write_text(json.dumps({"c_base": 0.04, "c_tok": 0.002}))
    bad = ["simulate", "--trace", str(small_trace), "--no-progress"]
    assert main([*bad, "--cost-curve", str(tmp_path / "line.json")]) == 1
    assert "holds no cost curve" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*bad, "--policy", "das/line"])
    assert "das/line needs --cost-curve" in capsys.readouterr().err


def test_simulate_labels_a_recorded_trace_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "real.jsonl"
    write_trace(path, [TraceRecord("g", 0, (1, 2), (3, 4, 5)), TraceRecord("g", 1, (1, 2), (3, 4))])
    assert main(["simulate", "--trace", str(path), "--policy", "fixed:2", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("policy fixed:2 | trace |")


def test_simulate_runs_several_policies_side_by_side(
    small_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_path = tmp_path / "runs.json"
    argv = ["simulate", "--trace", str(small_trace), "--policy", "none,suffix,das"]
    assert main([*argv, "--cost-model", "h100-7b", "--json", str(out_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # suffix states its own settings, not the history drafter's it does not use.
    assert "policy suffix | SYNTHETIC trace" in out
    assert "global cache of 10000 responses, depth 24, 16 tokens, spec factor 1.0" in out
    data = json.loads(out_path.read_text())
    runs = data["runs"]
    assert [run["policy"] for run in runs] == ["none", "suffix", "das"]
    assert runs[1]["suffix_decoding"]["max_spec_tokens"] == 16
    assert "suffix_decoding" not in runs[2]
    side = out.split("side by side: modeled makespan / makespan without speculation\n")[1]
    side = side.splitlines()
    assert side[0].split() == ["policy", "ep", "0", "ep", "1", "all", "tok/fwd"]
    for line, run in zip(side[1:], runs, strict=True):
        cells = line.split()
        assert cells[0] == run["policy"]
        assert float(cells[3]) == pytest.approx(run["total"]["makespan_ratio"], abs=5e-4)
    assert runs[0]["total"]["makespan_ratio"] == pytest.approx(1.0)
    assert runs[1]["total"]["accepted"] > 0  # the global cache drafts from the first epoch on


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["simulate"],
        ["simulate", "--trace", "t.jsonl", "--policy", "greedy"],
        ["simulate", "--trace", "t.jsonl", "--policy", "das,das"],
        ["simulate", "--trace", "t.jsonl", "--policy", "das,"],
        ["simulate", "--trace", "t.jsonl", "--policy", "fixed:0"],
        ["simulate", "--trace", "t.jsonl", "--c-base", "-1"],
        ["simulate", "--trace", "t.jsonl", "--c-tok", "abc"],
        ["simulate", "--trace", "t.jsonl", "--extra"],
        ["simulate", "--trace", "t.jsonl", "--max-depth", "1"],
        ["simulate", "--trace", "t.jsonl", "--window", "0"],
        ["simulate", "--trace", "t.jsonl", "--min-prob", "2"],
        ["synth-trace"],
        ["synth-trace", "--out", "t.jsonl", "--groups", "0"],
        ["synth-trace", "--out", "t.jsonl", "--samples", "x"],
        ["bogus"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_unreadable_or_bad_trace_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.jsonl"
    assert main(["simulate", "--trace", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"das: error: cannot read trace {missing}: No such file or directory\n"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"group": "g", "epoch": 0, "prompt": [], "output": [1]}\n{oops\n')
    assert main(["simulate", "--trace", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"das: error: bad trace: {bad}:2: not JSON")
    assert err.count("\n") == 1

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["simulate", "--trace", str(empty)]) == 1
    assert "holds no rollouts" in capsys.readouterr().err


def test_unwritable_outputs_exit_1(
    small_trace: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = tmp_path / "no" / "such" / "dir" / "out.json"
    argv = ["simulate", "--trace", str(small_trace), "--policy", "none", "--no-progress"]
    assert main([*argv, "--json", str(nowhere)]) == 1
    assert capsys.readouterr().err.startswith(f"das: error: cannot write {nowhere}")
    assert main(["synth-trace", "--out", str(nowhere)]) == 1
    assert capsys.readouterr().err.startswith(f"das: error: cannot write {nowhere}")


def test_console_script_end_to_end(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    run = [sys.executable, "-m", "service.cli"]
    synth = subprocess.run(
        [*run, "synth-trace", "--out", str(trace), "--groups", "2", "--samples", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert synth.returncode == 0, synth.stderr
    sim = subprocess.run(
        [*run, "simulate", "--trace", str(trace), "--policy", "fixed:8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert sim.returncode == 0, sim.stderr
    assert "policy fixed:8 | SYNTHETIC trace" in sim.stdout
    missing = subprocess.run(
        [*run, "simulate", "--trace", str(tmp_path / "absent.jsonl")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1
    usage = subprocess.run(
        [*run, "simulate", "--trace", str(trace), "--policy", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert usage.returncode == 2
    assert "unknown policy 'nope'" in usage.stderr


# Everything the wheel installs (pyproject: wheel.packages = drafter, service).
_IMPORT_THE_PACKAGE = """
import importlib, pkgutil, sys
import drafter, service
import service.cli
at_start = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "bench"))
for package in (drafter, service):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
benches = sorted(m for m in sys.modules if m.split(".")[0] == "bench")
print(at_start, benches, "matplotlib" in sys.modules)
"""


def test_the_installed_package_imports_no_benchmark_code() -> None:
    # bench/ and matplotlib stay out of the wheel: no module of drafter or service imports
    # them, and `das` itself starts without the engine (simulate and the service's flags).
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_THE_PACKAGE],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[]", "[]", "False"]
