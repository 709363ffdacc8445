from __future__ import annotations

import pytest

from drafter.cost import COST_PRESETS, H100_7B, SMOLLM2_CPU, CostModel, parse_cost_model


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
