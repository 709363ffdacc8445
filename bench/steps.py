"""Engine step times: one verify step (the runner's forward, then sampling every logits row as
the engine does) over batch sizes and tokens per row, on a real model.

    python -m bench.steps [--model smollm2-135m] [--threads N] [--torch-matmul] [--json OUT]

Each cell is the median of --repeats timings after one warm-up, every slot holding --context
cached tokens; the drafted rows are rolled back after each timing. --torch-matmul turns the
native small-batch matmul off (every matmul through torch/MKL), for comparison. Prints a table
and writes JSON; no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.rollout import machine_info
from service.engine.calibration import primed_runner, time_verify_step
from service.engine.models import load_model
from service.engine.runner import Runner
from service.worker import SamplingParams

DEFAULT_JSON = Path(__file__).parent / "results" / "steps.json"
ROWS = (1, 4, 16)
TOKENS_PER_ROW = (1, 5, 9, 17)


def measure(
    runner: Runner, rows: int, per_row: int, context: int, repeats: int
) -> tuple[float, float]:
    """(median forward seconds, median sampling seconds) of one rows x per_row verify step."""
    timings = time_verify_step(
        runner, rows, per_row, context, repeats, SamplingParams(temperature=0.7)
    )
    return statistics.median(f for f, _ in timings), statistics.median(s for _, s in timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--torch-matmul", action="store_true", help="no native small matmul")
    parser.add_argument("--context", type=int, default=128, help="cached tokens per slot")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    runner = primed_runner(
        model, max(ROWS), args.context, max(TOKENS_PER_ROW), small_matmul=not args.torch_matmul
    )
    matmul = "native small-batch kernel" if runner.small_matmul else "torch"
    print(f"{args.model} | torch threads {torch.get_num_threads()} | matmul: {matmul}")
    print("| rows x tokens per row | forward ms | sampling ms | step ms |")
    print("|---|---|---|---|")
    cells: list[dict[str, Any]] = []
    for rows in ROWS:
        for per_row in TOKENS_PER_ROW:
            forward, sampling = measure(runner, rows, per_row, args.context, args.repeats)
            cells.append(
                {
                    "rows": rows,
                    "tokens_per_row": per_row,
                    "forward_s": forward,
                    "sample_s": sampling,
                }
            )
            print(
                f"| {rows} x {per_row} | {forward * 1e3:.1f} | {sampling * 1e3:.1f} "
                f"| {(forward + sampling) * 1e3:.1f} |",
                flush=True,
            )
    payload = {
        "model": args.model,
        "small_matmul": runner.small_matmul,
        "context": args.context,
        "repeats": args.repeats,
        "machine": machine_info(),
        "cells": cells,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
