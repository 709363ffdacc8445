"""Where the speculation core's own time goes inside a real engine run: a timer around each of
its calls and the policy's (installed for the run, the originals put back after), around a
`das bench rollout` run with the same arguments.

    python -m bench.policy_profile --temperature 1.0 --modes das --epochs 2 --threads 2 \
        [--profile-json OUT.json]

prints each timed call's total time, calls and microseconds a call, and (with --profile-json)
writes them. Run one mode (--modes das): the timers do not tell modes apart. These are the
engine's own costs: right after a CPU forward the drafter's data and code are out of the caches,
and the same calls cost several times what a warm loop (bench.drafter) measures.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (module, class or "" for a module's function, attribute): what is timed, outermost first.
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("drafter.speculator", "Speculator", "drafts"),
    ("drafter.das", "DasPolicy", "budgets"),
    ("drafter.das", "DasPolicy", "_remaining"),
    ("drafter.budgets", "MatchRule", "budgets"),
    ("drafter.acceptance", "DraftCalibrator", "tick"),
    ("drafter.acceptance", "DraftCalibrator", "depth_ceilings"),
    ("drafter.acceptance", "DraftCalibrator", "table"),
    ("drafter.history", "RolloutHistory", "speculate_batch"),
    ("drafter.budgets", "MatchRule", "trim"),
    ("drafter.speculator", "Speculator", "extend_batch"),
    ("drafter.budgets", "MatchRule", "observe_drafts"),
    ("drafter.history", "RolloutHistory", "extend_batch"),
    ("drafter.speculator", "Speculator", "finish"),
)


@dataclass(slots=True)
class Timing:
    seconds: float = 0.0
    calls: int = 0


@contextmanager
def timers(targets: Sequence[tuple[str, str, str]] = TARGETS) -> Iterator[dict[str, Timing]]:
    """Within the block every target is wrapped in a timer; yields the timings by
    "Owner.attribute" (filled as calls return). The originals are back after the block."""
    timings: dict[str, Timing] = {}
    restore: list[Callable[[], None]] = []
    try:
        for module_name, owner_name, attribute in targets:
            module = importlib.import_module(module_name)
            owner: Any = getattr(module, owner_name) if owner_name else module
            label = f"{owner_name or module_name}.{attribute}"
            timing = timings.setdefault(label, Timing())
            undo: Callable[[], None]
            if attribute in vars(owner):  # its own: put it back after
                undo = functools.partial(setattr, owner, attribute, vars(owner)[attribute])
            else:  # inherited: remove the wrapper after
                undo = functools.partial(delattr, owner, attribute)
            setattr(owner, attribute, _timed(getattr(owner, attribute), timing))
            restore.append(undo)
        yield timings
    finally:
        for undo in reversed(restore):
            undo()


def _timed(function: Callable[..., Any], timing: Timing) -> Callable[..., Any]:
    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timing.seconds += time.perf_counter() - start
            timing.calls += 1

    return timed


def format_timings(timings: dict[str, Timing]) -> str:
    lines = [f"{'call':34} {'total ms':>10} {'calls':>8} {'us a call':>10}"]
    for label, timing in timings.items():
        per_call = timing.seconds / timing.calls * 1e6 if timing.calls else 0.0
        lines.append(f"{label:34} {timing.seconds * 1e3:10.1f} {timing.calls:8d} {per_call:10.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.policy_profile",
        description="Time the speculation core's calls inside a das bench rollout run "
        "(every other argument is das bench rollout's).",
    )
    parser.add_argument("--profile-json", type=Path, help="also write the timings here")
    args, rollout_args = parser.parse_known_args(argv)
    from bench.cli import main as bench_main  # the engine's imports, after our own checks

    with timers() as timings:
        status = bench_main(["rollout", *rollout_args])
    if status:
        return status
    print(format_timings(timings))
    if args.profile_json is not None:
        rows = {label: {"seconds": t.seconds, "calls": t.calls} for label, t in timings.items()}
        args.profile_json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
