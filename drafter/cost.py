"""The decode cost model: one forward pass over n tokens (all rows of the batch together) takes
t_fwd = c_base + c_tok * n seconds. Every budget rule prices draft tokens with it, so it is a
per-worker setting (`--cost-model`): measured on the worker's own engine at start-up
("calibrate"), a named preset, or "C_BASE,C_TOK" in seconds. A worker on a GPU must never plan
with the CPU preset: its step is ten times shorter.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class CostModel:
    """Time of one forward pass: c_base + c_tok * (tokens in it, all rows together), seconds.

    `steps`, where measured: the seconds of forwards of 1, 2, ... len(steps) tokens, which
    price draft tokens (draft_cost) where a line cannot: on a CPU the matmul changes kernels at
    a row count (measured here: one request's step of 1, 2, 3, 4 tokens took 33.7, 36.4, 39.6,
    54.5 ms), so a lone request's third draft token costs five times its second."""

    c_base: float
    c_tok: float
    steps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name, value in (("c_base", self.c_base), ("c_tok", self.c_tok)):
            if not math.isfinite(value) or value <= 0.0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if any(not math.isfinite(t) or t <= 0.0 for t in self.steps):
            raise ValueError("steps must be positive numbers of seconds")
        if any(b < a for a, b in itertools.pairwise(self.steps)):
            raise ValueError("steps must not decrease with tokens")

    def to_json(self) -> dict[str, object]:
        """{c_base, c_tok}, and steps where measured."""
        fields: dict[str, object] = {"c_base": self.c_base, "c_tok": self.c_tok}
        return {**fields, "steps": list(self.steps)} if self.steps else fields

    def step_time(self, n_tokens: int) -> float:
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        return self.c_base + self.c_tok * n_tokens

    def draft_cost(self, n_tokens: int, drafted: int) -> float:
        """What `drafted` draft tokens add to a forward of `n_tokens` tokens: by `steps` within
        them (c_tok a token past their end), else c_tok each."""
        if n_tokens < 0 or drafted < 0:
            raise ValueError("n_tokens and drafted must be >= 0")
        return self._measured(n_tokens + drafted) - self._measured(n_tokens)

    def draft_costs(self, n_tokens: int, drafted: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """draft_cost(n_tokens, d) for every d in `drafted` (each >= 0), in one array, computed
        as draft_cost computes it (the same floats)."""
        if n_tokens < 0 or (drafted.size and drafted.min() < 0):
            raise ValueError("n_tokens and drafted must be >= 0")
        steps = self.steps
        total = n_tokens + drafted
        if steps:  # steps[i - 1] up to len(steps) tokens (0 at none), a line beyond
            within = np.concatenate(([0.0], steps))[np.minimum(total, len(steps))]
            beyond = steps[-1] + self.c_tok * (total - len(steps))
            measured = np.where(total <= len(steps), within, beyond)
        else:
            measured = self.c_tok * total
        costs: npt.NDArray[np.float64] = measured - self._measured(n_tokens)
        return costs

    def _measured(self, n_tokens: int) -> float:
        steps = self.steps
        if not steps:
            return self.c_tok * n_tokens
        if n_tokens == 0:
            return 0.0
        if n_tokens <= len(steps):
            return steps[n_tokens - 1]
        return steps[-1] + self.c_tok * (n_tokens - len(steps))

    @classmethod
    def fit(cls, points: Sequence[tuple[int, float]]) -> CostModel:
        """Least-squares fit to (tokens in the forward pass, seconds) measurements."""
        if len({n for n, _ in points}) < 2:
            raise ValueError("fitting a cost model needs points at two or more token counts")
        tokens = np.asarray([n for n, _ in points], dtype=np.float64)
        seconds = np.asarray([t for _, t in points], dtype=np.float64)
        design = np.stack([np.ones_like(tokens), tokens], axis=1)
        (c_base, c_tok), *_ = np.linalg.lstsq(design, seconds, rcond=None)
        return cls(float(c_base), float(c_tok))


@dataclass(frozen=True, slots=True)
class CostCurve:
    """Local cost models by batch size: where a forward's matmuls are bound by streaming the
    weights (a CPU, or a GPU at a few rows), a token costs more at few rows than at many, so
    one line fitted over all batch sizes misprices drafts at both ends. Each point is
    (rows, the line through that many rows' steps with and without drafts); at(rows) is the
    line for a live batch of that size, interpolated between the calibrated row counts and
    held at the ends' per-token cost beyond them."""

    points: tuple[tuple[int, CostModel], ...]  # ascending, distinct row counts
    steps: tuple[float, ...] = ()  # as CostModel.steps, given to every local model

    def __post_init__(self) -> None:
        rows = [count for count, _ in self.points]
        if not rows or rows[0] < 1 or any(b <= a for a, b in itertools.pairwise(rows)):
            raise ValueError(f"a cost curve needs ascending row counts >= 1, got {rows}")

    def at(self, rows: int) -> CostModel:
        """The local cost model for a batch of `rows` requests: its step time without drafts
        (c_base + c_tok * rows) and what one more token costs (c_tok), both linear in rows
        between the two calibrated row counts around it."""
        points = self.points
        if rows <= points[0][0]:
            local = points[0][1]
        elif rows >= points[-1][0]:
            local = points[-1][1]
        else:
            (low, below), (high, above) = next(
                (low, high) for low, high in itertools.pairwise(points) if rows <= high[0]
            )
            share = (rows - low) / (high - low)
            step = (1 - share) * below.step_time(low) + share * above.step_time(high)
            c_tok = (1 - share) * below.c_tok + share * above.c_tok
            local = CostModel(max(step - c_tok * rows, 1e-9), c_tok)
        return replace(local, steps=self.steps)

    def step_seconds(self, rows: int, tokens: int) -> float:
        """A step of `rows` requests verifying `tokens` tokens in all (rows <= tokens): the
        local line's step of the rows alone, and what the tokens beyond them add (draft_cost,
        by the steps where measured)."""
        local = self.at(rows)
        return local.step_time(rows) + local.draft_cost(rows, tokens - rows)

    def to_json(self) -> list[dict[str, float]]:
        """[{rows, c_base, c_tok}, ...], as calibrations and results write the curve."""
        return [
            {"rows": rows, "c_base": local.c_base, "c_tok": local.c_tok}
            for rows, local in self.points
        ]

    @classmethod
    def from_json(
        cls, points: Sequence[dict[str, float]], steps: Sequence[float] = ()
    ) -> CostCurve:
        return cls(
            tuple(
                (int(point["rows"]), CostModel(float(point["c_base"]), float(point["c_tok"])))
                for point in points
            ),
            tuple(float(t) for t in steps),
        )

    @classmethod
    def fit(cls, steps: Sequence[tuple[int, int, float]]) -> CostCurve:
        """From (rows, tokens per row, seconds) step timings: at each row count, the line
        through its fewest and most tokens per row. A slope that is not positive (timing
        noise) takes the next row count's, or the previous one's at the end."""
        by_rows: dict[int, dict[int, float]] = {}
        for rows, per_row, seconds in steps:
            by_rows.setdefault(rows, {})[per_row] = seconds
        slopes: dict[int, float] = {}
        for rows, timed in by_rows.items():
            if len(timed) < 2:
                raise ValueError(f"a cost curve needs two token counts at {rows} rows")
            fewest, most = min(timed), max(timed)
            slopes[rows] = (timed[most] - timed[fewest]) / (rows * (most - fewest))
        counts = sorted(by_rows)
        usable = [rows for rows in counts if slopes[rows] > 0]
        if not usable:
            raise ValueError("no row count's timings rise with tokens")
        points = []
        for rows in counts:
            slope = slopes[rows]
            if slope <= 0:
                later = [other for other in usable if other > rows]
                slope = slopes[later[0] if later else usable[-1]]
            fewest = min(by_rows[rows])
            c_base = by_rows[rows][fewest] - slope * rows * fewest
            points.append((rows, CostModel(max(c_base, 1e-9), slope)))
        return cls(tuple(points))


# Steps of a row class (rows.bit_length()) that LiveStepCost keeps in mind: a step's weight
# halves after this many more steps of its class.
LIVE_HALF_LIFE_STEPS = 64
# The prior, as so many steps that cost exactly what the calibration says, their draft tokens
# adding a quarter of a step each: a class's first timed step moves its step's scale a third of the
# way, and the token price moves only once the class's draft tokens have added up to a few
# steps' worth (a batch's few draft tokens are lost in its steps' noise); it costs the fit
# about 2% of its way from 1 for good.
LIVE_PRIOR_STEPS = 2.0
# How far the learned scales may stray from the calibration, either way.
_LIVE_SCALE_BOUND = 4.0


class LiveStepCost:
    """Step costs that follow what the engine's verify steps measure while it serves.

    A start-up calibration is a few fastest-of-five timings of an idle engine at one context
    length, and on a busy machine its draft tokens come out the most wrong. In the T = 0.7
    rollout run at 9555ff5 one request's 6.5-token steps cost 60-72% more than its 1-token
    steps, where the calibration said 31%; in another, one noisy 1-token timing (71 ms, where
    the steps ran at 56-90) made the calibration's steps of 2 to 12 tokens all cost the same,
    so that das drafted 8-9 tokens a step into the tail at 7% acceptance. So each timed step
    (rows, tokens in the forward, seconds) is fitted per row class (rows.bit_length(): 1, 2-3,
    4-7, ...) as a * B + b * E: B the calibration's step of the rows alone (its line for the
    batch size), E its c_tok times the draft tokens; a and b by least squares over the class's
    recent steps (each step's weight halving after LIVE_HALF_LIFE_STEPS more), held toward 1 by
    LIVE_PRIOR_STEPS steps' worth of the calibration (module constants). at(rows) is the
    calibration's line at that batch size with its step scaled by a and its token price by b,
    and one request's steps (CostModel.steps) scaled by a: a line cannot learn where the matmul
    changes kernels, and the steps can (on an Intel Xeon here a forward of 13 tokens took 83
    ms against 62 for 12, the native kernel's last row count; priced by the line alone, das
    drafted past that step in batches of 8-15 rows, and a replay planned that way ran 1.9%
    slower at T = 1.0 and 2.6% at T = 0.7, README "Cost model"). A class not yet timed keeps
    the calibration as it is."""

    def __init__(
        self,
        calibrated: CostCurve,
        half_life_steps: float = LIVE_HALF_LIFE_STEPS,
        prior_steps: float = LIVE_PRIOR_STEPS,
    ) -> None:
        if half_life_steps <= 0 or prior_steps <= 0:
            raise ValueError("half_life_steps and prior_steps must be > 0")
        self.calibrated = calibrated
        self.prior_steps = prior_steps
        self._keep = 0.5 ** (1.0 / half_life_steps)
        # Per row class: the weighted sums [1, BB, BE, EE, By, Ey] over its timed steps.
        self._sums: dict[int, list[float]] = {}
        self.timed_steps = 0

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        """A verify step of `rows` requests and `tokens` tokens in all (rows <= tokens) took
        `seconds` (its forward and sampling, as the calibration times them)."""
        if rows < 1 or tokens < rows:
            raise ValueError(f"need 1 <= rows <= tokens, got {rows} rows, {tokens} tokens")
        if not math.isfinite(seconds) or seconds <= 0.0:
            raise ValueError(f"seconds must be positive, got {seconds}")
        local = self.calibrated.at(rows)
        base = local.step_time(rows)
        extra = local.c_tok * (tokens - rows)
        terms = (1.0, base * base, base * extra, extra * extra, base * seconds, extra * seconds)
        sums = self._sums.get(rows.bit_length(), [0.0] * len(terms))
        keep = self._keep
        # A new list put in place in one assignment: a reader on another thread (the worker's
        # cost-model endpoint, scales()) sees the class's sums before this step or after it,
        # never half updated.
        self._sums[rows.bit_length()] = [
            total * keep + term for total, term in zip(sums, terms, strict=True)
        ]
        self.timed_steps += 1

    def scales(self, rows: int) -> tuple[float, float]:
        """(a, b): what the steps of this batch size's class cost against the calibration, the
        step of the rows alone and what draft tokens add (1.0, 1.0 before any is timed)."""
        sums = self._sums.get(rows.bit_length())
        if sums is None:
            return 1.0, 1.0
        weight, bb, be, ee, by, ey = sums
        # Ridge toward a = b = 1: prior_steps of the class's average step, costing what the
        # calibration says, with draft tokens adding a quarter of it.
        hold_a = self.prior_steps * bb / weight
        hold_b = hold_a / 16
        bb, ee, by, ey = bb + hold_a, ee + hold_b, by + hold_a, ey + hold_b
        det = bb * ee - be * be
        a = (by * ee - ey * be) / det
        b = (ey * bb - by * be) / det
        low, high = 1.0 / _LIVE_SCALE_BOUND, _LIVE_SCALE_BOUND
        return min(max(a, low), high), min(max(b, low), high)

    def at(self, rows: int) -> CostModel:
        """The cost model for a live batch of `rows` requests, as it has measured them."""
        local = self.calibrated.at(rows)
        if rows.bit_length() not in self._sums:
            return local
        a, b = self.scales(rows)
        c_tok = local.c_tok * b
        steps = tuple(a * seconds for seconds in local.steps)
        return CostModel(max(a * local.step_time(rows) - c_tok * rows, 1e-9), c_tok, steps)

    def to_json(self) -> list[dict[str, float]]:
        """As CostCurve.to_json, each calibrated row count's line as re-timed so far, with
        its scales (scales())."""
        points = []
        for rows, _ in self.calibrated.points:
            model = self.at(rows)
            step_scale, token_scale = self.scales(rows)
            points.append(
                {
                    "rows": rows,
                    "c_base": model.c_base,
                    "c_tok": model.c_tok,
                    "step_scale": step_scale,
                    "token_scale": token_scale,
                }
            )
        return points


def read_cost_curve(path: str) -> tuple[CostModel, CostCurve]:
    """The fitted line and the cost curve of a calibration saved as JSON: a das bench rollout
    result (its config.cost_model) or that object alone."""
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    model = data["config"]["cost_model"] if "config" in data else data
    if not model.get("curve"):
        raise ValueError("it holds no cost curve (a calibration with --cost-model calibrate)")
    steps = tuple(float(t) for t in model.get("steps") or ())
    line = CostModel(float(model["c_base"]), float(model["c_tok"]), steps)
    return line, CostCurve.from_json(model["curve"], steps)


# SmolLM2-135M decode steps measured on this 2-core CPU (DESIGN.md; fp32, KV cache of 100
# tokens), as (tokens in the forward pass, seconds): batch 1 drafting 0/7/15 tokens, batch 16
# drafting 0/3/7 tokens per row.
SMOLLM2_CPU_STEPS: tuple[tuple[int, float], ...] = (
    (1, 0.058),
    (8, 0.079),
    (16, 0.092),
    (16, 0.096),
    (64, 0.209),
    (128, 0.315),
)
# CostModel.fit(SMOLLM2_CPU_STEPS), rounded: c_base 62.5 ms, c_tok 2.03 ms per token; mean
# relative error 4.4%, worst 11% (the 1-token step at batch 1, which the line overestimates).
SMOLLM2_CPU = CostModel(c_base=0.0625, c_tok=0.00203)
# A 7B model on one H100, the projection the engine issue asks for: 6.5 ms per step, 14 GFLOP
# per verified token at about 600 TFLOP/s.
H100_7B = CostModel(c_base=0.0065, c_tok=0.000023)

# Named cost models for --cost-model.
COST_PRESETS: dict[str, CostModel] = {"smollm2-cpu": SMOLLM2_CPU, "h100-7b": H100_7B}
CALIBRATE = "calibrate"


def parse_cost_model(text: str) -> CostModel | None:
    """A cost model from its setting: a preset name, "C_BASE,C_TOK" in seconds, or "calibrate"
    (None: the worker times its own verify step at start-up). ValueError for anything else."""
    spec = text.strip().lower()
    if spec == CALIBRATE:
        return None
    if spec in COST_PRESETS:
        return COST_PRESETS[spec]
    parts = spec.split(",")
    if len(parts) == 2:
        try:
            c_base, c_tok = (float(part) for part in parts)
        except ValueError:
            pass
        else:
            return CostModel(c_base, c_tok)  # raises for values that are not positive seconds
    names = ", ".join([CALIBRATE, *COST_PRESETS])
    raise ValueError(f"unknown cost model {text!r}: expected {names} or C_BASE,C_TOK in seconds")
