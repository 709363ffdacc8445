"""What re-timing steps while serving is worth: das replayed on a trace whose steps cost
otherwise than the start-up calibration says.

    python -m bench.retiming --trace T.jsonl --cost-curve BENCH.json [--token-scales 0.6 1 2]
                             [--noise 0.15] [--seed 0] [--policy das] [--json OUT]

The steps' true cost is the calibration's curve (a `das bench rollout` JSON, as `das simulate
--cost-curve` reads it) with what draft tokens add to a step scaled by each --token-scale (the
step of the rows alone as calibrated), each step's time then multiplied by log-normal noise
of sigma --noise and mean 1 (seeded): a busy machine's steps, as the engine times them. Three
planners replay the trace under it (drafter.simulator.simulate's planner): `knowing` plans by
the true curve, `calibrated` by the calibration, never corrected, and `re-timed` by
LiveStepCost over the calibration, learning each step's time as it runs, as the embedded
engine does. Prints each one's modeled makespan against none's (timed by the true curve
without noise) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from drafter.cost import CostCurve, CostModel, LiveStepCost, read_cost_curve
from drafter.simulator import simulate
from drafter.traces import read_trace

DEFAULT_JSON = Path(__file__).parent / "results" / "retiming.json"
PLANNERS = ("knowing", "calibrated", "re-timed")


def scale_draft_tokens(curve: CostCurve, scale: float) -> CostCurve:
    """The curve with what draft tokens add to a step times `scale` (c_tok and the rise of
    one request's steps over its first), each row count's step of its rows alone kept."""
    points = []
    for rows, local in curve.points:
        c_tok = local.c_tok * scale
        points.append((rows, CostModel(max(local.step_time(rows) - c_tok * rows, 1e-9), c_tok)))
    first = curve.steps[0] if curve.steps else 0.0
    return CostCurve(tuple(points), tuple(first + scale * (t - first) for t in curve.steps))


@dataclass(frozen=True, slots=True)
class NoisyCurve(CostCurve):
    """A cost curve whose every step takes its time under the curve times
    exp(N(-sigma^2 / 2, sigma)): 1 on average, so that the noise adds no time of its own."""

    sigma: float = 0.0
    seed: int = 0
    _rng: random.Random = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        CostCurve.__post_init__(self)
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def step_seconds(self, rows: int, tokens: int) -> float:
        noise = self._rng.lognormvariate(-(self.sigma**2) / 2, self.sigma)
        return CostCurve.step_seconds(self, rows, tokens) * noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="JSON-lines rollout trace")
    parser.add_argument(
        "--cost-curve", required=True, help="a das bench rollout JSON: its calibration"
    )
    parser.add_argument(
        "--token-scales",
        type=float,
        nargs="+",
        default=[0.6, 1.0, 2.0],
        help="what draft tokens truly cost against the calibration",
    )
    parser.add_argument("--noise", type=float, default=0.15, help="log-normal sigma of a step")
    parser.add_argument("--seed", type=int, default=0, help="the noise's seed")
    parser.add_argument("--policy", default="das", help="a das policy (das, das-rate, das-eq7)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args()
    if args.noise < 0 or any(scale <= 0 for scale in args.token_scales):
        parser.error("--noise must be >= 0 and every --token-scale > 0")
    line, calibrated = read_cost_curve(args.cost_curve)
    trace = read_trace(args.trace)
    rows = []
    print(f"{'tokens x':>8}  " + "  ".join(f"{name:>10}" for name in PLANNERS))
    for scale in args.token_scales:
        truth = scale_draft_tokens(calibrated, scale)
        planners: dict[str, CostCurve | LiveStepCost] = dict(
            zip(PLANNERS, (truth, calibrated, LiveStepCost(calibrated)), strict=True)
        )
        ratios = {}
        for name, planner in planners.items():
            # Each planner meets the same noise, step for step while they draft alike.
            timed = NoisyCurve(truth.points, truth.steps, args.noise, args.seed)
            result = simulate(trace, args.policy, line, cost_curve=timed, planner=planner)
            ratios[name] = result.total.makespan_ratio
        rows.append({"token_scale": scale, "makespan_ratio": ratios})
        print(f"{scale:>8}  " + "  ".join(f"{ratios[name]:>10.4f}" for name in PLANNERS))
    print(
        "makespan of das against none's (none timed by the true curve without noise); "
        "knowing: planned by the true curve, calibrated: by the calibration, re-timed: by the "
        "calibration corrected by each step's time (LiveStepCost)"
    )
    payload = {
        "trace": str(args.trace),
        "cost_curve": args.cost_curve,
        "policy": args.policy,
        "noise": args.noise,
        "seed": args.seed,
        "runs": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
