from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter.cost import (
    COST_PRESETS,
    H100_7B,
    SMOLLM2_CPU,
    CostCurve,
    CostModel,
    LiveStepCost,
    parse_cost_model,
    read_cost_curve,
)


def test_presets_constants_and_calibrate_parse() -> None:
    assert parse_cost_model("smollm2-cpu") == SMOLLM2_CPU
    assert parse_cost_model(" H100-7B ") == H100_7B
    assert set(COST_PRESETS) == {"smollm2-cpu", "h100-7b"}
    assert parse_cost_model("0.0065,0.000023") == CostModel(0.0065, 0.000023)
    assert parse_cost_model("1e-2, 2e-5") == CostModel(0.01, 2e-5)
    assert parse_cost_model("calibrate") is None  # the worker times its own verify step


@pytest.mark.parametrize(
    "text", ["", "fast", "0.01", "0.01,0.001,1", "0,0.001", "-1,0.001", "nan,1", "inf,1", "a,b"]
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cost_model(text)


def test_a_cost_model_prices_a_step_and_fits_points() -> None:
    cost = CostModel(0.01, 0.001)
    assert cost.step_time(10) == pytest.approx(0.02)
    fitted = CostModel.fit([(1, 0.011), (9, 0.019), (33, 0.043)])
    assert (fitted.c_base, fitted.c_tok) == pytest.approx((0.01, 0.001))
    with pytest.raises(ValueError, match="two or more token counts"):
        CostModel.fit([(4, 0.1), (4, 0.2)])


def _concave(rows: int, per_row: int) -> float:
    """A step whose tokens cost more at few rows: 30 ms + 4 ms/row + 6 / rows ms per draft
    token."""
    return 0.030 + 0.004 * rows + 0.006 / rows * rows * (per_row - 1)


def test_a_cost_curve_is_the_local_line_at_each_row_count_and_interpolates() -> None:
    steps = [(rows, n, _concave(rows, n)) for rows in (1, 2, 4, 8) for n in (1, 3)]
    curve = CostCurve.fit(steps)
    for rows in (1, 2, 4, 8):
        local = curve.at(rows)
        assert local.step_time(rows) == pytest.approx(_concave(rows, 1))
        assert local.c_tok == pytest.approx(0.006 / rows)
    # Between two row counts: step time and per-token cost both linear in rows.
    middle = curve.at(3)
    assert middle.step_time(3) == pytest.approx((_concave(2, 1) + _concave(4, 1)) / 2)
    assert middle.c_tok == pytest.approx((0.003 + 0.0015) / 2)
    # Beyond the ends: the end's line.
    assert curve.at(16) == curve.at(8) and curve.at(0) == curve.at(1)
    assert CostCurve.from_json(curve.to_json()) == curve


def test_a_cost_curve_slope_lost_to_noise_takes_its_neighbours() -> None:
    steps = [
        (1, 1, 0.030),
        (1, 3, 0.040),
        (2, 1, 0.050),
        (2, 3, 0.049),
        (4, 1, 0.08),
        (4, 3, 0.088),
    ]
    curve = CostCurve.fit(steps)
    assert curve.at(2).c_tok == pytest.approx(curve.at(4).c_tok) == pytest.approx(0.001)
    assert curve.at(2).step_time(2) == pytest.approx(0.050)
    with pytest.raises(ValueError, match="rise with tokens"):
        CostCurve.fit([(1, 1, 0.03), (1, 3, 0.02)])
    with pytest.raises(ValueError, match="two token counts"):
        CostCurve.fit([(1, 1, 0.03)])
    with pytest.raises(ValueError, match="ascending"):
        CostCurve(((2, SMOLLM2_CPU), (1, SMOLLM2_CPU)))


def test_measured_steps_price_draft_tokens_where_a_line_cannot() -> None:
    line = CostModel(0.030, 0.003)
    assert line.draft_cost(2, 3) == pytest.approx(0.009)  # c_tok each without steps
    # One request's steps of 1-4 tokens, a kernel change between 3 and 4 (as measured here).
    cost = CostModel(0.030, 0.003, (0.0337, 0.0364, 0.0396, 0.0545))
    assert cost.step_time(4) == pytest.approx(0.042)  # the line still prices whole steps
    assert cost.draft_cost(1, 2) == pytest.approx(0.0059)
    assert cost.draft_cost(1, 3) == pytest.approx(0.0208)
    assert cost.draft_cost(3, 3) == pytest.approx(0.0149 + 0.006)  # c_tok past the steps
    assert cost.draft_cost(6, 2) == pytest.approx(0.006)
    assert cost.draft_cost(0, 1) == pytest.approx(0.0337)
    assert cost.draft_cost(2, 0) == 0.0
    with pytest.raises(ValueError, match="not decrease"):
        CostModel(0.03, 0.003, (0.04, 0.03))
    with pytest.raises(ValueError, match="positive"):
        CostModel(0.03, 0.003, (0.0, 0.03))
    with pytest.raises(ValueError, match=">= 0"):
        cost.draft_cost(-1, 2)


def test_a_cost_curve_gives_its_steps_to_every_local_model(tmp_path: Path) -> None:
    steps = (0.0337, 0.0364, 0.0396, 0.0545)
    curve = replace(
        CostCurve.fit([(r, n, _concave(r, n)) for r in (1, 4) for n in (1, 3)]), steps=steps
    )
    assert all(curve.at(rows).steps == steps for rows in (1, 2, 4, 9))
    # A step: the local line for its rows, the steps for what its drafts add.
    assert curve.step_seconds(1, 4) == pytest.approx(_concave(1, 1) + 0.0545 - 0.0337)
    assert curve.step_seconds(4, 6) == pytest.approx(
        curve.at(4).step_time(4) + curve.at(4).c_tok * 2
    )
    plain = CostCurve.fit([(r, n, _concave(r, n)) for r in (1, 4) for n in (1, 3)])
    assert plain.step_seconds(2, 7) == pytest.approx(plain.at(2).step_time(7))
    saved = tmp_path / "calibration.json"
    saved.write_text(
        json.dumps({"c_base": 0.03, "c_tok": 0.003, "curve": curve.to_json(), "steps": list(steps)})
    )
    line, read = read_cost_curve(str(saved))
    assert line == CostModel(0.03, 0.003, steps)
    assert read.at(2).steps == steps and read.points == curve.points


# -- LiveStepCost ----------------------------------------------------------------------------

_CALIBRATED = CostCurve(
    ((1, CostModel(0.040, 0.004)), (4, CostModel(0.050, 0.003)), (16, CostModel(0.080, 0.002))),
    (0.044, 0.047, 0.050, 0.058, 0.062, 0.066),
)


def _step(curve: CostCurve, rows: int, tokens: int, a: float, b: float) -> float:
    """A step whose rows alone cost a x the calibration's line and its draft tokens b x."""
    local = curve.at(rows)
    return a * local.step_time(rows) + b * local.c_tok * (tokens - rows)


def test_a_live_cost_is_the_calibration_until_timed_then_its_line_while_they_agree() -> None:
    live = LiveStepCost(_CALIBRATED)
    assert all(live.at(rows) == _CALIBRATED.at(rows) for rows in (1, 3, 4, 9, 40))
    for tokens in (1, 3, 7, 2, 5):
        live.observe(1, tokens, _CALIBRATED.at(1).step_time(tokens))
    assert live.scales(1) == pytest.approx((1.0, 1.0), abs=1e-9)
    assert live.timed_steps == 5
    # Timed, the line and one request's steps as calibrated (CostModel.steps) at a = 1.
    line = live.at(1)
    assert (line.c_base, line.c_tok) == pytest.approx((0.040, 0.004))
    assert line.steps == pytest.approx(_CALIBRATED.steps)
    assert live.at(2) == _CALIBRATED.at(2)


def test_a_timed_class_keeps_the_kernel_step_of_one_requests_steps_scaled_by_its_step() -> None:
    # One request's steps jump at 4 tokens (a matmul changing kernels), which no line can say.
    calibrated = CostCurve(((1, CostModel(0.040, 0.004)),), (0.044, 0.047, 0.050, 0.075))
    live = LiveStepCost(calibrated, prior_steps=0.01)
    for step in range(200):  # the machine runs 1.5x slower than at start-up
        tokens = 1 + step % 3
        live.observe(1, tokens, 1.5 * calibrated.at(1).step_time(tokens))
    a, _ = live.scales(1)
    assert a == pytest.approx(1.5, rel=0.01)
    learned = live.at(1)
    assert learned.steps == pytest.approx(tuple(a * t for t in calibrated.steps))
    # The third draft token of a lone request crosses the jump and costs what it scaled to.
    assert learned.draft_cost(1, 3) - learned.draft_cost(1, 2) == pytest.approx(a * 0.025)
    assert learned.draft_cost(1, 3) > 3 * learned.c_tok


@settings(max_examples=60, deadline=None)
@given(
    rows=st.sampled_from([1, 2, 3, 4, 6, 16, 40]),
    a=st.floats(0.5, 2.0),
    b=st.floats(0.4, 3.0),
)
def test_a_live_cost_learns_what_a_batch_size_and_its_draft_tokens_cost(
    rows: int, a: float, b: float
) -> None:
    # A prior that leaves no mark: at 0.1 steps, with a = 2 and b = 0.4, it pulls b 4% up.
    live = LiveStepCost(_CALIBRATED, prior_steps=0.01)
    for step in range(400):  # draft tokens per row varying from step to step, as das drafts
        live.observe(
            rows, rows * (1 + step % 4), _step(_CALIBRATED, rows, rows * (1 + step % 4), a, b)
        )
    assert live.scales(rows) == pytest.approx((a, b), rel=0.02)
    (fit_a, fit_b), learned, calibrated = live.scales(rows), live.at(rows), _CALIBRATED.at(rows)
    if fit_a * calibrated.step_time(rows) > fit_b * calibrated.c_tok * rows:
        assert learned.step_time(rows) == pytest.approx(fit_a * calibrated.step_time(rows))
    else:  # a line cannot price the rows' own tokens at b x c_tok within a x the step
        assert learned.c_base == 1e-9
    steps = len(calibrated.steps)  # one request's steps, scaled by a, price up to them
    assert learned.steps == pytest.approx(tuple(fit_a * t for t in calibrated.steps))
    for drafted in (1, 3, rows, 3 * rows):
        expected = (
            fit_a * (calibrated.steps[rows + drafted - 1] - calibrated.steps[rows - 1])
            if rows + drafted <= steps
            else b * calibrated.c_tok * drafted
            if rows >= steps
            else None  # partly each: CostModel's own tests
        )
        if expected is not None:
            assert learned.draft_cost(rows, drafted) == pytest.approx(expected, rel=0.02)
    # Each row class learns alone: one request's steps say nothing of 16 rows' and back.
    other = 16 if rows < 8 else 1
    assert live.scales(other) == (1.0, 1.0) and live.at(other) == _CALIBRATED.at(other)


def test_a_live_cost_moves_part_way_on_its_first_steps_and_follows_a_change() -> None:
    live = LiveStepCost(_CALIBRATED)
    live.observe(4, 4, _step(_CALIBRATED, 4, 4, 2.0, 1.0))
    assert live.scales(4) == pytest.approx((4 / 3, 1.0))  # a third of the way: 2 prior steps
    live = LiveStepCost(_CALIBRATED, prior_steps=0.1)
    for _ in range(200):
        live.observe(4, 12, _step(_CALIBRATED, 4, 12, 1.0, 3.0))
        live.observe(4, 4, _step(_CALIBRATED, 4, 4, 1.0, 3.0))
    assert live.scales(4) == pytest.approx((1.0, 3.0), rel=0.02)
    for _ in range(300):  # the machine quietens: a few half-lives later it has followed
        live.observe(4, 12, _step(_CALIBRATED, 4, 12, 1.0, 1.5))
        live.observe(4, 4, _step(_CALIBRATED, 4, 4, 1.0, 1.5))
    assert live.scales(4) == pytest.approx((1.0, 1.5), rel=0.02)


def test_steps_without_drafts_move_only_the_step_and_wild_timings_are_bounded() -> None:
    live = LiveStepCost(_CALIBRATED, prior_steps=0.1)
    for _ in range(100):
        live.observe(16, 16, 1.3 * _CALIBRATED.at(16).step_time(16))
    assert live.scales(16) == pytest.approx((1.3, 1.0), rel=0.01)
    for _ in range(100):
        live.observe(2, 9, 100.0)
    assert live.scales(2) == (4.0, 4.0)
    with pytest.raises(ValueError, match="rows"):
        live.observe(3, 2, 0.1)
    with pytest.raises(ValueError, match="positive"):
        live.observe(1, 1, 0.0)
    with pytest.raises(ValueError, match="> 0"):
        LiveStepCost(_CALIBRATED, half_life_steps=0)


def test_a_live_cost_reports_each_calibrated_row_count_as_re_timed() -> None:
    live = LiveStepCost(_CALIBRATED, prior_steps=0.1)
    for _ in range(50):
        live.observe(1, 1, 2 * _CALIBRATED.at(1).step_time(1))
    report = live.to_json()
    assert [point["rows"] for point in report] == [1, 4, 16]
    assert report[0]["step_scale"] == pytest.approx(2.0, rel=0.01)
    assert report[0]["c_base"] == pytest.approx(live.at(1).c_base)
    assert report[1] == {**_CALIBRATED.to_json()[1], "step_scale": 1.0, "token_scale": 1.0}
