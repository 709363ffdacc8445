"""The cost model is a per-worker setting: resolved by the engine, reported by the worker."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import torch

from drafter.cost import H100_7B, SMOLLM2_CPU, CostCurve, CostModel, LiveStepCost
from service.engine import Engine, EngineConfig
from service.engine import engine as engine_module
from service.engine.calibration import Calibration
from service.settings import Settings
from service.worker import GenerateRequest, SamplingParams
from service.worker_app import create_app
from tests.service.conftest import free_port, start_server


def engine(tiny_model: torch.nn.Module, **config: Any) -> Engine:
    return Engine(EngineConfig(max_batch=2, max_model_len=64, **config), model=tiny_model)


def test_das_prices_drafts_with_the_configured_cost_model(tiny_model: torch.nn.Module) -> None:
    assert engine(tiny_model, speculation="das", cost_model="h100-7b").policy.cost == H100_7B
    given = engine(tiny_model, speculation="das-eq7", cost_model="0.01,0.001")
    assert given.policy.cost == CostModel(0.01, 0.001) and given.cost_source == "0.01,0.001"
    assert engine(tiny_model, speculation="fixed:4").policy.cost is None  # prices nothing


def test_calibrate_times_this_engine_and_never_falls_back_to_cpu_constants_off_a_cpu(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    fallbacks: list[CostModel | None] = []

    def fake(model: torch.nn.Module, max_batch: int, context: int, **kw: Any) -> Calibration:
        fallbacks.append(kw["fallback"])
        assert model is tiny_model and max_batch == 2 and context == 54  # max_model_len - 10
        if kw["fallback"] is None:
            raise ValueError("the fit is not positive")
        return Calibration(CostModel(0.02, 0.002), "calibrated")

    monkeypatch.setattr(engine_module, "calibrate_cost", fake)
    timed = engine(tiny_model, speculation="das")
    assert timed.policy.cost == CostModel(0.02, 0.002) and timed.cost_source == "calibrated"
    with pytest.raises(ValueError, match="set cost_model to C_BASE,C_TOK"):
        engine(tiny_model, speculation="das", device="cuda")
    assert fallbacks == [SMOLLM2_CPU, None]
    engine(tiny_model, speculation="none")  # no das: nothing to calibrate
    assert len(fallbacks) == 2


def test_the_worker_reports_its_cost_model_in_server_info_and_metrics() -> None:
    port = free_port()
    settings = Settings(
        model="tiny-random", port=port, worker_id="w", max_model_len=128, cost_model="h100-7b"
    )
    server = start_server(create_app(settings), port)
    try:
        info = httpx.get(f"{server.url}/get_server_info").json()
        assert info["cost_model"] == {"c_base": 0.0065, "c_tok": 2.3e-05, "source": "h100-7b"}
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'das_cost_model_seconds{term="c_base",worker="w"} 0.0065' in metrics
        assert 'das_cost_model_seconds{term="c_tok",worker="w"} 2.3e-05' in metrics
    finally:
        server.stop()


def test_a_calibrated_curve_reprices_das_and_the_worker_reports_it(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = (0.03, 0.031, 0.05)
    curve = CostCurve(((1, CostModel(0.03, 0.005)), (2, CostModel(0.04, 0.002))), steps)

    def fake(model: torch.nn.Module, max_batch: int, context: int, **kw: Any) -> Calibration:
        return Calibration(CostModel(0.02, 0.002, steps), "calibrated", curve=curve)

    monkeypatch.setattr(engine_module, "calibrate_cost", fake)
    timed = engine(tiny_model, speculation="das")
    live = timed.speculator.cost_curve
    assert isinstance(live, LiveStepCost) and live.calibrated is curve
    assert timed.cost == CostModel(0.02, 0.002, steps)
    # It times each step it decodes (the prompt's prefill prices no draft): the tiny model's
    # steps take far less than the curve's 30 ms, so the learned step is at its bound.
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    timed.generate([GenerateRequest("r", [1, 2, 3, 4], params)])
    assert live.timed_steps == timed.stats.forward_passes - 1 >= 1
    assert live.scales(1)[0] == 0.25
    port = free_port()
    settings = Settings(model="tiny-random", port=port, worker_id="w", max_model_len=128)
    server = start_server(create_app(settings), port)
    try:
        info = httpx.get(f"{server.url}/get_server_info").json()["cost_model"]
        assert info["source"] == "calibrated" and (info["c_base"], info["c_tok"]) == (0.02, 0.002)
        calibrated = {"step_scale": 1.0, "token_scale": 1.0}  # no step timed yet
        assert info["by_batch_size"] == [
            {"rows": 1, "c_base": 0.03, "c_tok": 0.005, **calibrated},
            {"rows": 2, "c_base": 0.04, "c_tok": 0.002, **calibrated},
        ]
        assert info["steps"] == list(steps)
        # The metrics export the curve, and follow the steps timed while serving.
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'das_step_cost_seconds{rows="1",term="c_base",worker="w"} 0.03\n' in metrics
        assert 'das_step_cost_seconds{rows="2",term="c_tok",worker="w"} 0.002\n' in metrics
        body = {
            "input_ids": [1, 2, 3, 4],
            "sampling_params": {"max_new_tokens": 20, "temperature": 0.0, "ignore_eos": True},
        }
        assert httpx.post(f"{server.url}/generate", json=body, timeout=30).status_code == 200
        learned = httpx.get(f"{server.url}/get_server_info").json()["cost_model"]
        one_row = learned["by_batch_size"][0]
        assert one_row["rows"] == 1 and one_row["step_scale"] != 1.0  # re-timed
        series = 'das_step_cost_seconds{rows="1",term="c_base",worker="w"}'
        expected = f"{series} {one_row['c_base']}\n"
        deadline = time.monotonic() + 5.0
        while expected not in httpx.get(f"{server.url}/metrics").text:
            assert time.monotonic() < deadline, "the metrics never showed the re-timed curve"
            time.sleep(0.05)
    finally:
        server.stop()
