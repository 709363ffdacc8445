from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import retiming
from drafter.cost import CostCurve, CostModel
from drafter.traces import synthetic_trace, write_trace

CURVE = CostCurve(
    ((1, CostModel(0.5, 0.3)), (4, CostModel(1.0, 0.05)), (8, CostModel(2.0, 0.02))),
    (0.8, 0.9, 1.2),
)


def test_scaled_draft_tokens_keep_each_step_of_its_rows_alone() -> None:
    doubled = retiming.scale_draft_tokens(CURVE, 2.0)
    for rows in (1, 3, 4, 6, 8):  # the calibrated row counts and between
        assert doubled.at(rows).step_time(rows) == pytest.approx(CURVE.at(rows).step_time(rows))
        for tokens in (rows + 1, rows + 2, 3 * rows):
            added = CURVE.step_seconds(rows, tokens) - CURVE.step_seconds(rows, rows)
            assert doubled.step_seconds(rows, tokens) - doubled.step_seconds(
                rows, rows
            ) == pytest.approx(2 * added)


def test_noise_is_one_on_average_and_none_is_the_curve() -> None:
    quiet = retiming.NoisyCurve(CURVE.points, CURVE.steps, 0.0)
    assert quiet.step_seconds(4, 9) == CURVE.step_seconds(4, 9)
    noisy = retiming.NoisyCurve(CURVE.points, CURVE.steps, 0.3, seed=1)
    times = [noisy.step_seconds(4, 9) for _ in range(20_000)]
    assert len(set(times)) > 1000
    assert sum(times) / len(times) == pytest.approx(CURVE.step_seconds(4, 9), rel=0.02)


def test_it_replays_each_planner_and_writes_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace, bench_json, out = tmp_path / "t.jsonl", tmp_path / "bench.json", tmp_path / "out.json"
    write_trace(trace, synthetic_trace(groups=3, samples=4, epochs=3, seed=3))
    bench_json.write_text(
        json.dumps({"c_base": 1.0, "c_tok": 0.05, "curve": CURVE.to_json(), "steps": [0.8, 0.9]})
    )
    argv = ["retiming", "--trace", str(trace), "--cost-curve", str(bench_json)]
    argv += ["--token-scales", "1", "2", "--noise", "0", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    retiming.main()
    runs = json.loads(out.read_text())["runs"]
    assert [run["token_scale"] for run in runs] == [1.0, 2.0]
    same, doubled = (run["makespan_ratio"] for run in runs)
    # Calibrated right, re-timing costs nothing (it plans by the line it times, not one
    # request's steps, so its drafts differ a little: no more than 1% slower); wrong, it
    # recovers most of the loss.
    assert same["knowing"] == pytest.approx(same["calibrated"])
    assert same["re-timed"] <= same["knowing"] * 1.01
    lost = doubled["calibrated"] - doubled["knowing"]
    assert lost > 0 and doubled["re-timed"] - doubled["knowing"] < lost / 2
