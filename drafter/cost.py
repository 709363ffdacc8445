"""The decode cost model: one forward pass over n tokens (all rows of the batch together) takes
t_fwd = c_base + c_tok * n seconds. Every budget rule prices draft tokens with it, so it is a
per-worker setting (`--cost-model`): measured on the worker's own engine at start-up
("calibrate"), a named preset, or "C_BASE,C_TOK" in seconds. A worker on a GPU must never plan
with the CPU preset: its step is ten times shorter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class CostModel:
    """Time of one forward pass: c_base + c_tok * (tokens in it, all rows together), seconds."""

    c_base: float
    c_tok: float

    def __post_init__(self) -> None:
        for name, value in (("c_base", self.c_base), ("c_tok", self.c_tok)):
            if not math.isfinite(value) or value <= 0.0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")

    def step_time(self, n_tokens: int) -> float:
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        return self.c_base + self.c_tok * n_tokens

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
