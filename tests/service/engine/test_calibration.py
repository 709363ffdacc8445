from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch

from drafter.cost import H100_7B, SMOLLM2_CPU, CostModel
from service.engine import calibration
from service.engine.calibration import calibrate_cost, cost_model_name
from service.engine.runner import Runner
from service.worker import SamplingParams


def test_calibration_times_four_points_and_the_curve(tiny_model: torch.nn.Module) -> None:
    result = calibrate_cost(tiny_model, max_batch=3, context=8, repeats=1)
    assert [(rows, per_row) for rows, per_row, _ in result.points] == [
        (1, 1),
        (1, 9),
        (3, 1),
        (3, 9),
    ]
    assert [(rows, per_row) for rows, per_row, _ in result.curve_points] == [
        (rows, per_row) for rows in (1, 2, 3) for per_row in (1, 3)
    ]
    assert all(seconds > 0 for _, _, seconds in result.points + result.curve_points)
    assert result.source in ("calibrated", "smollm2-cpu (calibration fit unusable)")
    assert result.cost.c_base > 0 and result.cost.c_tok > 0
    assert len(result.step_points) == 16 and all(s > 0 for s in result.step_points)
    assert result.cost.steps == tuple(itertools.accumulate(result.step_points, max))
    assert set(result.to_json()) == {
        *("source", "c_base", "c_tok", "context", "points", "curve", "curve_points"),
        *("step_points", "steps"),
    }


def _fake_timer(
    monkeypatch: pytest.MonkeyPatch, seconds: Callable[[int, int], float]
) -> list[tuple[int, int, bool]]:
    """Replace the timed step: each of a call's `repeats` steps of rows x per_row tokens takes
    seconds(rows, per_row), asked once a step in the order they are timed. Returns the calls'
    (rows, per_row, warm_up), as they come."""
    calls: list[tuple[int, int, bool]] = []

    def fake(
        runner: Runner,
        rows: int,
        per_row: int,
        context: int,
        repeats: int,
        _: SamplingParams,
        warm_up: bool = True,
    ) -> list[tuple[float, float]]:
        calls.append((rows, per_row, warm_up))
        return [(seconds(rows, per_row), 0.0) for _ in range(repeats)]

    monkeypatch.setattr(calibration, "time_verify_step", fake)
    return calls


def _timed_as(
    monkeypatch: pytest.MonkeyPatch, seconds_of: CostModel | None
) -> list[tuple[int, int, bool]]:
    """Each step takes seconds_of's time, or less the more tokens it holds (None: a fit with a
    negative slope, as noise gives on a tiny model)."""

    def seconds(rows: int, per_row: int) -> float:
        tokens = rows * per_row
        return 0.1 - 0.001 * tokens if seconds_of is None else seconds_of.step_time(tokens)

    return _fake_timer(monkeypatch, seconds)


def test_a_line_of_timings_is_fitted(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _timed_as(monkeypatch, CostModel(0.02, 0.001))
    result = calibrate_cost(tiny_model, max_batch=4, context=8, repeats=2, fallback=None)
    steps = [(rows, per_row) for rows, per_row, _ in calls]
    curve_steps = [(rows, per_row) for rows in (1, 2, 4) for per_row in (1, 3)]
    one_request = [(1, tokens) for tokens in range(1, 17)]
    # Two rounds, each timing every distinct point once.
    grid = list(dict.fromkeys([(1, 1), (1, 9), (4, 1), (4, 9), *curve_steps, *one_request]))
    assert len(grid) == 21 and steps == grid * 2  # (1, 1), (1, 3), (1, 9) timed once a round
    assert result.source == "calibrated" and result.context == 8
    assert result.cost.c_base == pytest.approx(0.02)
    assert result.cost.c_tok == pytest.approx(0.001)
    # Timings on one line give that line at every batch size.
    assert result.curve is not None
    line = [0.02 + 0.001 * tokens for tokens in range(1, 17)]
    assert result.cost.steps == pytest.approx(line)
    for rows in (1, 3, 4, 9):
        local = result.curve.at(rows)
        assert (local.c_base, local.c_tok) == pytest.approx((0.02, 0.001))
        assert local.steps == result.cost.steps
        assert local.draft_cost(rows, 2) == pytest.approx(0.002)


@pytest.mark.parametrize("burst_start", [0, 7, 30, 61, 95])
def test_a_burst_of_other_work_slows_no_point_in_every_round(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, burst_start: int
) -> None:
    # Other work on the machine makes 5 timed steps in a row 3x slower: the rounds give each
    # point 4 untouched timings, so the calibration is what it would be on a quiet machine.
    line = CostModel(0.02, 0.001)
    timed = 0

    def seconds(rows: int, per_row: int) -> float:
        nonlocal timed
        slow = burst_start <= timed < burst_start + 5
        timed += 1
        return line.step_time(rows * per_row) * (3.0 if slow else 1.0)

    calls = _fake_timer(monkeypatch, seconds)
    result = calibrate_cost(tiny_model, max_batch=4, context=8, repeats=5, fallback=None)
    warm_ups = [(rows, per_row) for rows, per_row, warm_up in calls if warm_up]
    assert timed == 5 * 21 and len(warm_ups) == len(set(warm_ups)) == 21
    for rows, per_row, seconds in result.points + result.curve_points:
        assert seconds == pytest.approx(line.step_time(rows * per_row))
    assert result.curve is not None
    assert result.curve.at(4).c_tok == pytest.approx(0.001)


def test_a_jump_in_one_requests_steps_is_kept_and_dips_are_levelled(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As measured here: 1-3 tokens on one matmul kernel, 4 and more on another.
    def seconds(tokens: int) -> float:
        return 0.034 + 0.003 * tokens + (0.015 if tokens >= 4 else 0.0)

    dip = {(1, 6): 0.9}  # one noisy timing below its neighbours
    _fake_timer(
        monkeypatch, lambda rows, per_row: seconds(rows * per_row) * dip.get((rows, per_row), 1.0)
    )
    result = calibrate_cost(tiny_model, max_batch=2, context=8, repeats=1, fallback=None)
    assert result.step_points[5] == pytest.approx(0.9 * seconds(6))
    assert result.cost.steps[5] == pytest.approx(seconds(5))  # levelled to the one before
    assert result.cost.steps[:4] == pytest.approx([seconds(n) for n in range(1, 5)])
    # A lone request's third draft token crosses the jump: it costs 0.003 + 0.015.
    assert result.cost.draft_cost(1, 2) == pytest.approx(0.006)
    assert result.cost.draft_cost(1, 3) == pytest.approx(0.024)


@pytest.mark.parametrize(
    ("fallback", "source"),
    [
        (SMOLLM2_CPU, "smollm2-cpu (calibration fit unusable)"),
        (H100_7B, "h100-7b (calibration fit unusable)"),
        (CostModel(0.5, 0.25), "0.5,0.25 (calibration fit unusable)"),
    ],
)
def test_an_unusable_fit_falls_back(
    tiny_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    fallback: CostModel,
    source: str,
) -> None:
    _timed_as(monkeypatch, None)
    result = calibrate_cost(tiny_model, max_batch=2, context=8, repeats=1, fallback=fallback)
    assert (result.cost, result.source, result.curve) == (fallback, source, None)
    assert len(result.points) == 4


def test_the_default_fallback_is_the_cpu_preset(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    _timed_as(monkeypatch, None)
    assert calibrate_cost(tiny_model, max_batch=2, context=8, repeats=1).cost == SMOLLM2_CPU


def test_an_unusable_fit_without_a_fallback_raises(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A GPU worker passes fallback=None: it must not plan with this CPU's constants.
    _timed_as(monkeypatch, None)
    with pytest.raises(ValueError, match="calibration fit is unusable"):
        calibrate_cost(tiny_model, max_batch=2, context=8, repeats=1, fallback=None)


@pytest.mark.parametrize("change", [{"max_batch": 0}, {"context": 0}, {"repeats": 0}])
def test_bad_arguments_raise(tiny_model: torch.nn.Module, change: dict[str, int]) -> None:
    arguments = {"max_batch": 2, "context": 8, "repeats": 1, **change}
    with pytest.raises(ValueError, match="must be >= 1"):
        calibrate_cost(tiny_model, **arguments)


def test_cost_model_names() -> None:
    assert cost_model_name(SMOLLM2_CPU) == "smollm2-cpu"
    assert cost_model_name(H100_7B) == "h100-7b"
    assert cost_model_name(CostModel(0.01, 0.002)) == "0.01,0.002"
