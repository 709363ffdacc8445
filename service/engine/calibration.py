"""Calibrating the cost model on the engine's own runner: time verify steps (the runner's
forward, then sampling every logits row, as the engine does) and fit t = c_base + c_tok * n.

A worker calibrates at start-up with `--cost-model calibrate`; bench.steps times the same step
over a grid. A fit that is not positive (timing noise on a tiny model) falls back to a given
cost model, or raises where none is given: a GPU worker must never plan with a CPU's constants.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from drafter.cost import COST_PRESETS, SMOLLM2_CPU, CostCurve, CostModel
from service.engine.runner import Runner
from service.engine.sampling import Span, sample_spans
from service.worker import SamplingParams

CALIBRATED = "calibrated"
# Tokens per row timed for the fit: a plain decode step and a step verifying an 8-token draft.
_TOKENS_PER_ROW = (1, 9)
# Tokens per row timed for the curve (at every power of two rows up to the batch, and the
# batch): a decode step and one verifying 2-token drafts, das's usual size.
_CURVE_TOKENS_PER_ROW = (1, 3)
# One request's steps of 1 to this many tokens, timed each (CostModel.steps): where the matmul
# changes kernels with the row count (here at 4 rows) a line misprices the first draft tokens.
_STEP_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Calibration:
    cost: CostModel
    source: str  # "calibrated", a preset name, or "<fallback> (calibration fit unusable)"
    points: tuple[tuple[int, int, float], ...] = ()  # (rows, tokens per row, fastest seconds)
    context: int = 0  # cached tokens per row while timing
    # Local cost models by batch size (CostCurve), from the curve's points; None when given.
    curve: CostCurve | None = None
    curve_points: tuple[tuple[int, int, float], ...] = ()
    # Fastest seconds of one request's step of 1, 2, ... tokens, as timed (the cost models
    # above carry them made non-decreasing).
    step_points: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        def timings(points: tuple[tuple[int, int, float], ...]) -> list[dict[str, Any]]:
            return [
                {"rows": rows, "tokens_per_row": per_row, "seconds": seconds}
                for rows, per_row, seconds in points
            ]

        return {
            "source": self.source,
            "c_base": self.cost.c_base,
            "c_tok": self.cost.c_tok,
            "context": self.context,
            "points": timings(self.points),
            "curve": None if self.curve is None else self.curve.to_json(),
            "curve_points": timings(self.curve_points),
            "step_points": list(self.step_points),
            "steps": list(self.cost.steps),
        }


def primed_runner(
    model: torch.nn.Module,
    slots: int,
    context: int,
    room: int,
    small_matmul: bool = True,
    small_matmul_rows: int | None = None,
    native_attention: bool = True,
) -> Runner:
    """A runner whose every slot caches the same `context` tokens, with `room` positions more
    (small_matmul, small_matmul_rows and native_attention as Runner takes them)."""
    runner = Runner(
        model,
        slots,
        context + room,
        small_matmul=small_matmul,
        small_matmul_rows=small_matmul_rows,
        native_attention=native_attention,
    )
    vocab = runner.vocab_size
    runner.forward([0], [[3 + (17 * i) % (vocab - 3) for i in range(context)]], [1])
    for slot in range(1, slots):
        runner.copy_prefix(0, slot, context)
    return runner


def time_verify_step(
    runner: Runner,
    rows: int,
    per_row: int,
    context: int,
    repeats: int,
    params: SamplingParams,
    warm_up: bool = True,
) -> list[tuple[float, float]]:
    """(forward seconds, sampling seconds) of `repeats` verify steps of `rows` slots x `per_row`
    tokens, after one untimed warm-up (unless warm_up is False): the runner's forward, then
    sampling every logits row, as the engine does. Each step is rolled back to `context` cached
    tokens."""
    vocab = runner.vocab_size
    slots = list(range(rows))
    chunks = [[3 + (5 * i) % (vocab - 3) for i in range(per_row)]] * rows
    timings = []
    for _ in range(repeats + 1 if warm_up else repeats):
        start = time.perf_counter()
        logits = runner.forward(slots, chunks, [per_row] * rows)
        _synchronize(runner.device)  # a GPU forward returns before its kernels finish
        middle = time.perf_counter()
        sample_spans(logits, [Span(row * per_row, per_row, params, 0, row, 0) for row in slots])
        _synchronize(runner.device)
        timings.append((middle - start, time.perf_counter() - middle))
        for slot in slots:
            runner.truncate(slot, context)
    return timings[1:] if warm_up else timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibrate_cost(
    model: torch.nn.Module,
    max_batch: int,
    context: int = 128,
    repeats: int = 5,
    temperature: float = 0.7,
    *,
    fallback: CostModel | None = SMOLLM2_CPU,
) -> Calibration:
    """Time verify steps over `context` cached tokens: at batch 1 and max_batch with 1 and 9
    tokens per row, to fit t = c_base + c_tok * tokens; for the curve (CostCurve), 1 and 3
    tokens per row at 1, 2, 4, ... rows and max_batch; and one request's steps of 1 to 16
    tokens, which both carry as CostModel.steps (each the most of those timed up to it, so that
    they never fall). Each point is the fastest of `repeats` timings after one warm-up (the
    least disturbed by other work on a shared machine), timed in rounds, every round timing
    each point once: a burst of other work then slows one timing of each point it meets, not
    every timing of one point. (Timed point after point, one start-up priced a draft token at 4
    rows at 0.26 ms, where the run before had calibrated 5.1 ms on the same machine.) A fit that
    is not positive returns `fallback` (and no curve), or raises ValueError if it is None; a
    curve that cannot be fitted is left out."""
    if max_batch < 1 or context < 1 or repeats < 1:
        raise ValueError("max_batch, context and repeats must be >= 1")
    runner = primed_runner(model, max_batch, context, max(*_TOKENS_PER_ROW, _STEP_TOKENS))
    params = SamplingParams(temperature=temperature)
    line_grid = [(rows, n) for rows in sorted({1, max_batch}) for n in _TOKENS_PER_ROW]
    curve_rows = sorted({*(2**i for i in range(max_batch.bit_length())), max_batch})
    curve_grid = [(rows, n) for rows in curve_rows for n in _CURVE_TOKENS_PER_ROW]
    step_grid = [(1, n) for n in range(1, _STEP_TOKENS + 1)]
    grid = list(dict.fromkeys([*line_grid, *curve_grid, *step_grid]))  # each point once
    fastest: dict[tuple[int, int], float] = {}
    for round_ in range(repeats):
        for point in grid:
            ((forward, sampling),) = time_verify_step(
                runner, *point, context, 1, params, warm_up=round_ == 0
            )
            fastest[point] = min(fastest.get(point, math.inf), forward + sampling)
    points = [(rows, n, fastest[rows, n]) for rows, n in line_grid]
    curve_points = [(rows, n, fastest[rows, n]) for rows, n in curve_grid]
    try:
        cost = CostModel.fit([(rows * per_row, seconds) for rows, per_row, seconds in points])
    except ValueError as error:
        if fallback is None:
            timed = ", ".join(f"{rows}x{per_row}: {s * 1e3:.2f} ms" for rows, per_row, s in points)
            raise ValueError(f"the calibration fit is unusable ({error}; timed {timed})") from None
        source = f"{cost_model_name(fallback)} (calibration fit unusable)"
        return Calibration(fallback, source, tuple(points), context)
    step_points = tuple(fastest[point] for point in step_grid)
    steps = tuple(itertools.accumulate(step_points, max))
    cost = replace(cost, steps=steps)
    try:
        curve: CostCurve | None = replace(CostCurve.fit(curve_points), steps=steps)
    except ValueError:
        curve = None
    return Calibration(
        cost, CALIBRATED, tuple(points), context, curve, tuple(curve_points), step_points
    )


def cost_model_name(cost: CostModel) -> str:
    """A preset's name, else "C_BASE,C_TOK" (what --cost-model takes for it)."""
    name = next((name for name, preset in COST_PRESETS.items() if preset == cost), None)
    return name if name is not None else f"{cost.c_base},{cost.c_tok}"
