"""Engine step times: one verify step (the runner's forward, then sampling every logits row as
the engine does) over batch sizes and tokens per row, on a real model.

    python -m bench.steps [--model smollm2-135m] [--threads N] [--torch-matmul | --native-matmul]
                          [--json OUT]
    python -m bench.steps --trees [--rows 1 4 16] [--nodes 4 8 16] [--json OUT]
    python -m bench.steps --attention [--json OUT]
    python -m bench.steps --matmul [--json OUT]

Each cell is the median of --repeats timings after one warm-up, every slot holding --context
cached tokens; the drafted rows are rolled back after each timing. By default the runner
takes the native small-batch matmul up to the row count where it measured it faster than torch
(MKL); --torch-matmul turns it off (every matmul through torch) and --native-matmul takes it up
to 64 rows whatever it measured, for comparison. --trees times
instead the forward of a batch whose drafts are trees against the same batch with chains of
as many tokens (TREE_SHAPES), timings of the two interleaved, and Runner.keep_path.
--attention times the forward of even and ragged verify steps (RAGGED_STEPS: a share of the
rows carrying a draft, spread over the slots as a real batch leaves them) with torch's
attention (padded calls per width class, scattered chunks one slot at a time) and with the
native kernel's one call per layer, two runners taking turns. --matmul times, at each count
of token rows in MATMUL_ROWS, every matmul weight of the model once (streamed from memory, as
in a forward) with torch (MKL) and each native kernel this CPU runs (AVX2, AVX-512), then the
forward of one request verifying that many tokens with the runner's measured choice and with
torch only, taking turns. Prints a table and writes JSON; no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.rollout import machine_info
from service.engine import _kernels
from service.engine.calibration import primed_runner, time_verify_step
from service.engine.models import load_model
from service.engine.runner import Runner
from service.worker import SamplingParams

DEFAULT_JSON = Path(__file__).parent / "results" / "steps.json"
TREES_JSON = Path(__file__).parent / "results" / "steps_trees.json"
ATTENTION_JSON = Path(__file__).parent / "results" / "steps_attention.json"
MATMUL_JSON = Path(__file__).parent / "results" / "steps_matmul.json"
MATMUL_ROWS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)
ROWS = (1, 4, 16)
TOKENS_PER_ROW = (1, 5, 9, 17)
DRAFT_NODES = (4, 8, 16)


def _fork(nodes: int) -> list[int]:
    """Two chains from the root, the first one longer by at most one node."""
    first = (nodes + 1) // 2
    return [-1, *range(first - 1), -1, *range(first, nodes - 1)][:nodes]


def _binary(nodes: int) -> list[int]:
    """A complete binary tree below the root's one child."""
    return [-1, *((j - 1) // 2 for j in range(1, nodes))]


def _star(nodes: int) -> list[int]:
    """Every node a child of the root (the widest tree: depth 1)."""
    return [-1] * nodes


TREE_SHAPES = {"fork": _fork, "binary": _binary, "star": _star}

# (rows, every how many rows one carries a draft (0: none), tokens of each draft).
RAGGED_STEPS = (
    (1, 0, 0),
    (1, 1, 3),
    (4, 0, 0),
    (4, 4, 2),
    (16, 0, 0),
    (16, 4, 2),
    (16, 4, 4),
    (16, 1, 2),
    (32, 0, 0),
    (32, 4, 2),
    (32, 4, 4),
    (32, 1, 2),
)


def matmul_label(runner: Runner) -> str:
    if not runner.small_matmul:
        return "torch"
    first, last = runner.small_matmul_rows
    return f"native small-batch kernel at {first}-{last} rows, torch otherwise"


def measure(
    runner: Runner, rows: int, per_row: int, context: int, repeats: int
) -> tuple[float, float]:
    """(median forward seconds, median sampling seconds) of one rows x per_row verify step."""
    timings = time_verify_step(
        runner, rows, per_row, context, repeats, SamplingParams(temperature=0.7)
    )
    return statistics.median(f for f, _ in timings), statistics.median(s for _, s in timings)


def measure_trees(
    runner: Runner, rows: int, parents: list[int], context: int, repeats: int
) -> tuple[float, float, float]:
    """(median chain forward, median tree forward, median keep_path) seconds: `rows` slots
    each verifying its last token and a draft of len(parents) nodes, as a chain and as this
    tree, the two timed in turn after one warm-up each."""
    vocab = runner.vocab_size
    slots = list(range(rows))
    chunk = [3 + (5 * i) % (vocab - 3) for i in range(len(parents) + 1)]
    chunks, logits = [chunk] * rows, [len(chunk)] * rows
    timings: dict[str, list[float]] = {"chain": [], "tree": [], "keep": []}
    path = [j for j, parent in enumerate(parents) if parent == -1][-1:]  # a node to move
    for repeat in range(repeats + 1):
        for kind in ("chain", "tree"):
            start = time.perf_counter()
            runner.forward(slots, chunks, logits, [parents] * rows if kind == "tree" else None)
            elapsed = time.perf_counter() - start
            if kind == "tree":
                start = time.perf_counter()
                for slot in slots:
                    runner.keep_path(slot, context + 1, path)
                if repeat:
                    timings["keep"].append(time.perf_counter() - start)
            if repeat:
                timings[kind].append(elapsed)
            for slot in slots:
                runner.truncate(slot, context)
    chain, tree, keep = (statistics.median(timings[k]) for k in ("chain", "tree", "keep"))
    return chain, tree, keep


def main_trees(args: argparse.Namespace) -> None:
    model, _ = load_model(args.model)
    rows_grid, nodes_grid = args.rows or ROWS, args.nodes or DRAFT_NODES
    runner = primed_runner(model, max(rows_grid), args.context, max(nodes_grid) + 1)
    matmul = matmul_label(runner)
    print(f"{args.model} | torch threads {torch.get_num_threads()} | matmul: {matmul}")
    print(
        "| rows x draft nodes | shape | chain forward ms | tree forward ms | tree / chain "
        "| keep_path ms |"
    )
    print("|---|---|---|---|---|---|")
    cells: list[dict[str, Any]] = []
    for rows in rows_grid:
        for nodes in nodes_grid:
            for shape, build in TREE_SHAPES.items():
                parents = build(nodes)
                chain, tree, keep = measure_trees(runner, rows, parents, args.context, args.repeats)
                cells.append(
                    {
                        "rows": rows,
                        "draft_nodes": nodes,
                        "shape": shape,
                        "parents": parents,
                        "chain_forward_s": chain,
                        "tree_forward_s": tree,
                        "keep_path_s": keep,
                    }
                )
                print(
                    f"| {rows} x {nodes} | {shape} | {chain * 1e3:.1f} | {tree * 1e3:.1f} "
                    f"| {tree / chain:.3f} | {keep * 1e3:.2f} |",
                    flush=True,
                )
    write_cells(args.json or TREES_JSON, args, runner, cells)


def main_attention(args: argparse.Namespace) -> None:
    model, _ = load_model(args.model)
    rows_max = max(rows for rows, _, _ in RAGGED_STEPS)
    room = max(1 + draft for _, _, draft in RAGGED_STEPS)
    runners = {
        name: primed_runner(model, rows_max, args.context, room, native_attention=native)
        for name, native in (("torch", False), ("native", True))
    }
    if not runners["native"].native_attention:
        raise SystemExit("the native attention kernel does not apply on this machine")
    vocab = runners["native"].vocab_size
    print(f"{args.model} | torch threads {torch.get_num_threads()} | context {args.context}")
    print(
        "| rows | drafting rows x draft tokens | torch attention ms | native ms | native / torch |"
    )
    print("|---|---|---|---|---|")
    cells: list[dict[str, Any]] = []
    for rows, every, draft in RAGGED_STEPS:
        sizes = [1 + draft if every and row % every == every - 1 else 1 for row in range(rows)]
        chunks = [
            [3 + (5 * i + row) % (vocab - 3) for i in range(n)] for row, n in enumerate(sizes)
        ]
        timed: dict[str, list[float]] = {name: [] for name in runners}
        for repeat in range(args.repeats + 1):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner.forward(list(range(rows)), chunks, sizes)
                if repeat:  # the first round warms up
                    timed[name].append(time.perf_counter() - start)
                for slot in range(rows):
                    runner.truncate(slot, args.context)
        torch_s, native_s = (statistics.median(timed[name]) for name in runners)
        drafting = sum(n > 1 for n in sizes)
        cells.append(
            {
                "rows": rows,
                "drafting_rows": drafting,
                "draft_tokens": draft,
                "torch_attention_forward_s": torch_s,
                "native_attention_forward_s": native_s,
            }
        )
        print(
            f"| {rows} | {drafting} x {draft} | {torch_s * 1e3:.1f} | {native_s * 1e3:.1f} "
            f"| {native_s / torch_s:.2f} |",
            flush=True,
        )
    write_cells(args.json or ATTENTION_JSON, args, runners["native"], cells)


def main_matmul(args: argparse.Namespace) -> None:
    model, _ = load_model(args.model)
    runner = primed_runner(model, 1, args.context, max(MATMUL_ROWS))
    chosen = runner.small_matmul_rows
    threads = torch.get_num_threads()
    weights = runner.matmul_weights()
    inputs = {w.shape[1]: torch.randn(max(MATMUL_ROWS), w.shape[1]) for w, _ in weights}

    def native(avx512: bool) -> Any:
        def multiply(x: torch.Tensor, w: torch.Tensor) -> None:
            _kernels.linear(x, w, x.new_empty(x.shape[0], w.shape[0]), threads, avx512)

        return multiply

    kernels: dict[str, Any] = {"torch": torch.nn.functional.linear}
    if _kernels.available():
        kernels["avx2"] = native(False)
        if _kernels.has_avx512():
            kernels["avx512"] = native(True)
    plans = {"runner": chosen, "torch only": (0, 0)}
    print(f"{args.model} | threads {threads} | runner's native matmul rows: {chosen}")
    print(
        "| token rows | "
        + " | ".join(f"matmuls {k} ms" for k in kernels)
        + " | "
        + " | ".join(f"forward {k} ms" for k in plans)
        + " |"
    )
    print("|---|" + "---|" * (len(kernels) + len(plans)))
    cells = []
    tokens = [3 + (7 * i) % (runner.vocab_size - 3) for i in range(max(MATMUL_ROWS))]
    for rows in MATMUL_ROWS:
        timed: dict[str, list[float]] = {name: [] for name in [*kernels, *plans]}
        for _ in range(args.repeats):
            for name, multiply in kernels.items():
                start = time.perf_counter()
                for weight, _ in weights:
                    multiply(inputs[weight.shape[1]][:rows], weight)
                timed[name].append(time.perf_counter() - start)
            for name, plan in plans.items():
                runner.small_matmul_rows = plan
                start = time.perf_counter()
                runner.forward([0], [tokens[:rows]], [rows])
                timed[name].append(time.perf_counter() - start)
                runner.truncate(0, args.context)
        runner.small_matmul_rows = chosen
        medians = {name: statistics.median(values) for name, values in timed.items()}
        cells.append({"token_rows": rows, "seconds": medians})
        print(
            f"| {rows} | " + " | ".join(f"{medians[k] * 1e3:.1f}" for k in timed) + " |",
            flush=True,
        )
    write_cells(args.json or MATMUL_JSON, args, runner, cells)


def write_cells(
    out: Path, args: argparse.Namespace, runner: Runner, cells: list[dict[str, Any]]
) -> None:
    """The measured cells as JSON, with what they were measured on."""
    payload = {
        "model": args.model,
        "small_matmul_rows": runner.small_matmul_rows,
        "context": args.context,
        "repeats": args.repeats,
        "machine": machine_info(),
        "cells": cells,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--torch-matmul", action="store_true", help="no native small matmul")
    which.add_argument(
        "--native-matmul", action="store_true", help="the native small matmul up to 64 rows"
    )
    parser.add_argument("--context", type=int, default=128, help="cached tokens per slot")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--trees", action="store_true", help="tree drafts against chains of as many tokens"
    )
    parser.add_argument(
        "--attention", action="store_true", help="torch against native attention, ragged steps"
    )
    parser.add_argument(
        "--matmul", action="store_true", help="the matmul kernels and the runner's choice by rows"
    )
    parser.add_argument("--rows", type=int, nargs="+", help=f"--trees: batch sizes {ROWS}")
    parser.add_argument("--nodes", type=int, nargs="+", help=f"--trees: nodes {DRAFT_NODES}")
    parser.add_argument("--json", type=Path, default=None, help="where to write results")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.trees:
        main_trees(args)
        return
    if args.attention:
        main_attention(args)
        return
    if args.matmul:
        main_matmul(args)
        return
    args.json = args.json or DEFAULT_JSON
    model, _ = load_model(args.model)
    runner = primed_runner(
        model,
        max(ROWS),
        args.context,
        max(TOKENS_PER_ROW),
        small_matmul=not args.torch_matmul,
        small_matmul_rows=64 if args.native_matmul else None,
    )
    matmul = matmul_label(runner)
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
    write_cells(args.json, args, runner, cells)


if __name__ == "__main__":
    main()
