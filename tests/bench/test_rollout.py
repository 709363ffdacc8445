from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from bench.rollout import (
    DEFAULT_MODES,
    BenchResult,
    RolloutConfig,
    build_workload,
    count_mismatches,
    format_table,
    mode_engine,
    record_trace,
    rollout_seed,
    run_bench,
    run_epochs_in_turn,
    trace_records,
    write_plot,
)
from drafter.cost import H100_7B, SMOLLM2_CPU, CostCurve, CostModel, LiveStepCost
from drafter.simulator import simulate
from drafter.traces import read_trace, write_trace
from service.engine.engine import STEP_PHASES

T = TypeVar("T")

# 2 prompts x 2 samples x 2 epochs x 16 tokens on the tiny random model.
TINY = RolloutConfig(
    model="tiny-random",
    prompts="math:2",
    samples=2,
    epochs=2,
    max_tokens=16,
    cost="smollm2-cpu",
)
RUN_FIELDS = {
    "mode": str,
    "epoch": int,
    "rollouts": int,
    "makespan_s": float,
    "tokens": int,
    "steps": int,
    "forwards": int,
    "drafted": int,
    "accepted": int,
    "prefill_tokens": int,
    "tokens_per_forward": float,
    "tokens_per_step": float,
    "accepted_per_forward": float,
    "tokens_per_s": float,
    "mean_step_s": float,
    "mismatched_rollouts": int,
    "lengths": list,
    "mismatches": list,
    "batch_size_over_time": list,
    "steps_by_rows": list,
    "step_seconds": dict,
}


@pytest.fixture(scope="module")
def greedy_result(tiny_model: torch.nn.Module) -> BenchResult:
    # Greedy rollouts repeat across epochs, so fixed:8 drafts do get accepted in epoch 1:
    # the mismatch check then covers real acceptance, not only rejected drafts.
    config = RolloutConfig(**{**_fields(TINY), "temperature": 0.0})
    return run_bench(config, tiny_model, None)


def _fields(config: RolloutConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in RolloutConfig.__dataclass_fields__}


def test_defaults_are_the_documented_workload() -> None:
    config = RolloutConfig()
    assert (config.model, config.prompts, config.samples, config.epochs) == (
        "smollm2-135m",
        "math",
        4,
        4,
    )
    assert (config.max_tokens, config.temperature, config.max_batch) == (512, 0.7, None)
    assert config.modes == DEFAULT_MODES == ("none", "fixed:8", "das")
    assert config.cost == "calibrate"


@pytest.mark.parametrize(
    ("cost", "source", "model"),
    [
        ("smollm2-cpu", "smollm2-cpu", SMOLLM2_CPU),
        ("h100-7b", "h100-7b", H100_7B),
        ("0.01,0.001", "0.01,0.001", CostModel(0.01, 0.001)),
    ],
)
def test_a_given_cost_model_reaches_the_result_unmeasured(
    tiny_model: torch.nn.Module, cost: str, source: str, model: CostModel
) -> None:
    config = RolloutConfig(**{**_fields(TINY), "cost": cost, "modes": ("das",), "epochs": 1})
    result = run_bench(config, tiny_model, None)
    assert (result.calibration.cost, result.calibration.source) == (model, source)
    assert result.calibration.points == ()


@pytest.mark.parametrize(
    "change",
    [
        {"samples": 0},
        {"epochs": 0},
        {"max_tokens": 0},
        {"temperature": 2.5},
        {"seed": -1},
        {"modes": ()},
        {"modes": ("none", "bogus")},
        {"modes": ("fixed:8", " fixed:8")},
        {"modes": ("das/line", "das /line")},
        {"modes": ("fixed:8/line",)},
        {"max_batch": 0},
        {"cost": "guess"},
        {"cost": "0,1"},
    ],
)
def test_bad_configs_raise(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RolloutConfig(**{**_fields(TINY), **change})  # type: ignore[arg-type]


def test_none_runs_first_as_the_reference() -> None:
    config = RolloutConfig(modes=("das", "fixed:4", "none"))
    assert config.ordered_modes == ("none", "das", "fixed:4")
    assert RolloutConfig(modes=("das",)).ordered_modes == ("das",)
    assert RolloutConfig(modes=("das-rate/line", "das")).ordered_modes == (
        "das-rate/line",
        "das",
    )


def test_seeds_are_distinct_per_epoch_and_prompt_and_fixed_by_the_seed() -> None:
    seeds = {rollout_seed(0, epoch, prompt) for epoch in range(8) for prompt in range(32)}
    assert len(seeds) == 8 * 32
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert rollout_seed(0, 1, 2) == rollout_seed(0, 1, 2) != rollout_seed(1, 1, 2)


def test_workload_requests(tiny_model: torch.nn.Module) -> None:
    workload = build_workload(TINY, None, 512)
    assert workload.groups == ("prompt-0", "prompt-1")
    assert workload.rollouts_per_epoch == 4
    first, second = workload.requests(0, 0), workload.requests(1, 0)
    assert [r.group for r in first] == ["prompt-0", "prompt-1"]
    assert [r.params.n for r in first] == [2, 2]
    assert len({r.params.seed for r in first + second}) == 4
    assert [r.params.seed for r in first] == [r.params.seed for r in workload.requests(0, 0)]


def test_bench_json_schema(greedy_result: BenchResult) -> None:
    data = json.loads(json.dumps(greedy_result.to_json()))
    assert set(data) == {"config", "machine", "definitions", "runs", "summary"}
    config = data["config"]
    assert config["modes"] == ["none", "fixed:8", "das"]
    assert config["reference_mode"] == "none"
    assert config["max_batch"] == config["rollouts_per_epoch"] == 4
    assert config["cost_model"]["source"] == "smollm2-cpu"
    assert config["cost_model"]["c_base"] == SMOLLM2_CPU.c_base
    assert {"torch", "cpu_model", "cpu_count", "torch_threads", "load_average_at_start"} <= set(
        data["machine"]
    )
    assert [(run["mode"], run["epoch"]) for run in data["runs"]] == [
        (mode, epoch) for mode in ("none", "fixed:8", "das") for epoch in (0, 1)
    ]
    for run in data["runs"]:
        assert set(run) == set(RUN_FIELDS)
        for key, kind in RUN_FIELDS.items():
            assert isinstance(run[key], kind), key
        assert run["rollouts"] == 4
        assert run["tokens"] == sum(run["lengths"]) == 4 * 16  # no EOS: tiny random, greedy
        assert run["makespan_s"] > 0
        assert run["steps"] <= run["forwards"]
        timeline = run["batch_size_over_time"]
        assert max(n for _, n in timeline) == 4  # every rollout of the epoch at once
        assert timeline[-1][1] == 0
        assert [t for t, _ in timeline] == sorted(t for t, _ in timeline)
        assert timeline[-1][0] == pytest.approx(run["makespan_s"], abs=1e-4)
        profile = run["steps_by_rows"]
        assert [row["rows"] for row in profile] == sorted(
            (row["rows"] for row in profile), key=lambda rows: int(rows.split("-")[0])
        )
        assert {row["rows"] for row in profile} <= {"1", "2-3", "4-7"}
        assert sum(row["steps"] for row in profile) == run["steps"]
        steps = {row["rows"]: row["steps"] for row in profile}
        for key in ("drafted", "accepted", "prefill"):
            total = sum(row[f"{key}_per_step"] * row["steps"] for row in profile)
            assert total == pytest.approx(run[key if key != "prefill" else "prefill_tokens"])
        seconds = sum(row["mean_step_s"] * steps[row["rows"]] for row in profile)
        assert seconds == pytest.approx(run["makespan_s"], rel=1e-6)
        phases = run["step_seconds"]
        assert tuple(phases) == STEP_PHASES
        assert all(value >= 0 for value in phases.values())
        assert phases["forward"] > 0
        assert sum(phases.values()) <= run["makespan_s"]  # each phase is inside a timed step
    assert [row["mode"] for row in data["summary"]] == ["none", "fixed:8", "das"]
    assert data["summary"][0]["makespan_ratio"] == 1.0


def _logged(step: Callable[[], T], name: str, log: list[str]) -> Callable[[], T]:
    def logged() -> T:
        log.append(name)
        return step()

    return logged


def test_modes_take_turns_step_by_step(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    workload = build_workload(TINY, None, 512)
    modes = ("none", "fixed:8")
    engines = {
        mode: mode_engine(TINY, mode, tiny_model, None, workload, SMOLLM2_CPU) for mode in modes
    }
    order: list[str] = []
    for mode, engine in engines.items():
        monkeypatch.setattr(engine, "step", _logged(engine.step, mode, order))
    runs = run_epochs_in_turn(engines, workload, TINY, 0)
    steps = {mode: runs[mode].steps for mode in modes}
    both = min(steps.values())
    rounds = [order[2 * i : 2 * i + 2] for i in range(both)]  # one step each while both run
    assert rounds == [list(modes) if i % 2 == 0 else list(reversed(modes)) for i in range(both)]
    assert len(order) == sum(steps.values())
    for mode in modes:
        assert engines[mode].history.version == 1  # the epoch's training step happened
        assert runs[mode].makespan_s == pytest.approx(runs[mode].batch_size_over_time[-1][0])


def test_speculation_changes_no_rollout(greedy_result: BenchResult) -> None:
    for run in greedy_result.runs:
        assert run.mismatched_rollouts == 0
    none = greedy_result.runs_of("none")
    assert all(run.forwards == run.tokens and run.accepted == 0 for run in none)
    assert all(run.to_json()["tokens_per_forward"] == 1.0 for run in none)
    fixed_epoch_1 = greedy_result.runs_of("fixed:8")[1]
    assert fixed_epoch_1.accepted > 0  # drafts were accepted, and still nothing changed
    assert fixed_epoch_1.forwards < fixed_epoch_1.tokens
    for mode in ("fixed:8", "das"):
        for run, ref in zip(greedy_result.runs_of(mode), none, strict=True):
            assert run.outputs == ref.outputs


def test_sampled_rollouts_also_match_across_modes(tiny_model: torch.nn.Module) -> None:
    result = run_bench(TINY, tiny_model, None)
    assert [run.mismatched_rollouts for run in result.runs] == [0] * 6
    assert result.runs_of("none")[0].outputs != result.runs_of("none")[1].outputs


def test_count_mismatches_counts_changed_and_missing_rollouts(
    greedy_result: BenchResult,
) -> None:
    reference = greedy_result.runs_of("none")
    copy = [
        type(run)(**{**{f: getattr(run, f) for f in run.__dataclass_fields__}}) for run in reference
    ]
    copy[0].outputs = dict(copy[0].outputs)
    key = next(iter(copy[0].outputs))
    copy[0].outputs[key] = [*copy[0].outputs[key][:-1], 1]
    del copy[0].outputs[next(k for k in copy[0].outputs if k != key)]
    count_mismatches(copy, reference)
    assert [run.mismatched_rollouts for run in copy] == [2, 0]
    changed = next(m for m in copy[0].mismatches if "position" in m)
    assert changed["position"] == 15 and changed["token"] == 1
    assert copy[1].mismatches == []


def test_table_has_a_row_per_mode_and_epoch(greedy_result: BenchResult) -> None:
    lines = format_table(greedy_result).splitlines()
    assert lines[0].startswith("model tiny-random | prompts math:2 (2) x 2 samples x 2 epochs")
    assert "cost model for das: smollm2-cpu" in lines[1]
    assert lines[2].split()[:3] == ["mode", "epoch", "makespan_s"]
    rows = [line.split() for line in lines[3:9]]
    assert [(row[0], row[1]) for row in rows] == [
        (mode, epoch) for mode in ("none", "fixed:8", "das") for epoch in ("0", "1")
    ]
    assert all(row[-1] == "0" for row in rows)
    phases = [line.split() for line in lines if "ms per step:" in line]
    assert [row[0] for row in phases] == ["none", "fixed:8", "das"]
    assert phases[0][4::2] == list(STEP_PHASES)


def test_calibrate_is_the_default_cost_and_reaches_the_das_policy(
    tiny_model: torch.nn.Module,
) -> None:
    config = RolloutConfig(**{**_fields(TINY), "cost": "calibrate", "modes": ("das",)})
    result = run_bench(config, tiny_model, None)
    data = result.to_json()
    source = data["config"]["cost_model"]["source"]
    assert source in ("calibrated", "smollm2-cpu (calibration fit unusable)")
    assert len(result.runs) == 2
    if data["config"]["cost_model"]["curve"]:  # das re-timed its steps: each epoch says how
        calibrated_rows = [point["rows"] for point in data["config"]["cost_model"]["curve"]]
        for run in data["runs"]:
            assert [point["rows"] for point in run["live_cost"]] == calibrated_rows
            assert all(point["step_scale"] > 0 for point in run["live_cost"])


def test_das_is_priced_by_the_curve_re_timed_das_startup_by_the_curve_das_line_by_the_line(
    tiny_model: torch.nn.Module,
) -> None:
    curve = CostCurve(((1, CostModel(0.03, 0.005)), (4, CostModel(0.05, 0.001))))
    workload = build_workload(TINY, None, tiny_model.config.vocab_size)
    engines = {
        mode: mode_engine(TINY, mode, tiny_model, None, workload, SMOLLM2_CPU, curve)
        for mode in ("das", "das-rate", "das/startup", "das/line")
    }
    live = [engines[mode].speculator.cost_curve for mode in ("das", "das-rate")]
    assert all(isinstance(each, LiveStepCost) and each.calibrated is curve for each in live)
    assert live[0] is not live[1]  # each engine learns its own steps
    assert engines["das/startup"].speculator.cost_curve is curve
    assert engines["das/line"].speculator.cost_curve is None
    assert engines["das/line"].policy.cost == SMOLLM2_CPU
    assert {engine.policy.name for engine in engines.values()} == {"das", "das-rate"}


def test_trace_is_readable_and_simulates(tmp_path: Path, tiny_model: torch.nn.Module) -> None:
    progress: list[int] = []
    records, runs = record_trace(TINY, tiny_model, None, progress.append)
    assert sum(progress) == 2 * 2 * 2
    assert len(records) == 8
    assert [(r.epoch, r.group) for r in records[:4]] == [
        (0, "prompt-0"),
        (0, "prompt-0"),
        (0, "prompt-1"),
        (0, "prompt-1"),
    ]
    path = tmp_path / "trace.jsonl"
    write_trace(path, records)
    for line in path.read_text().splitlines():
        assert set(json.loads(line)) == {"group", "epoch", "prompt", "output"}
    loaded = read_trace(path)
    assert loaded == records
    assert not any(record.synthetic for record in loaded)
    result = simulate(loaded, "fixed:8", SMOLLM2_CPU)
    assert [report.tokens for report in result.epochs] == [run.tokens for run in runs]
    assert trace_records(runs, build_workload(TINY, None, 512)) == records


def test_plot_writes_a_png(tmp_path: Path, greedy_result: BenchResult) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    write_plot(greedy_result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suffix_runs_side_by_side_and_changes_no_rollout(tiny_model: torch.nn.Module) -> None:
    config = RolloutConfig(**{**_fields(TINY), "temperature": 0.0, "modes": ("suffix", "none")})
    result = run_bench(config, tiny_model, None)
    assert sorted(run.mode for run in result.runs) == ["none", "none", "suffix", "suffix"]
    assert [run.mismatched_rollouts for run in result.runs] == [0] * 4
    # Epoch 1 repeats epoch 0's greedy rollouts, which stay in suffix's global cache.
    suffix_epoch_1 = result.runs_of("suffix")[1]
    assert suffix_epoch_1.accepted > 0
    assert suffix_epoch_1.forwards < suffix_epoch_1.tokens
