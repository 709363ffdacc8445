"""The `das` command line.

    das simulate --trace T.jsonl [--policy das|das-eq7|fixed:K|suffix|none[,...]] [--json OUT]
                 [--cost-model smollm2-cpu|h100-7b|C_BASE,C_TOK] [--c-base S --c-tok S]
                 [--max-depth D --window W]
    das synth-trace --out T.jsonl [--groups G --samples N --epochs E --seed S]
    das trace ... | das bench rollout ...   (see bench/cli.py)
    das serve | worker | gateway ...        (see service/commands.py)

Each subcommand adds its parser in build_parser and sets `handler`, a function of the parsed
arguments that returns the exit status (serve, worker and gateway: see service/commands.py).
`trace` and `bench rollout` are benchmark code, which the installed package does not carry:
they hand their arguments on to bench/cli.py, imported only when they run, and exit 1 with one
line where it cannot be imported (an installation outside a repository checkout).
Bad arguments exit 2 (argparse); a file that cannot be read or written exits 1 with one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from drafter.config import DrafterConfig
from drafter.cost import SMOLLM2_CPU, CostModel, parse_cost_model, read_cost_curve
from drafter.policy_spec import (
    LINE_PRICED,
    STARTUP_PRICED,
    canonical_mode,
    mode_policy,
    parse_policy_spec,
)
from drafter.simulator import EpochReport, SimulationResult, simulate
from drafter.traces import read_trace, synthetic_trace, write_trace
from service.commands import add_gateway_parser, add_serve_parser, add_worker_parser
from service.settings import Settings

# A command that takes the arguments argparse left (a command line of its own).
Forward = Callable[[list[str]], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    forward: Forward | None = getattr(args, "forward", None)
    if forward is not None:
        return forward(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    status: int = args.handler(args)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="das", description="DAS rollout serving: drafter tools and the rollout service."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_simulate(commands)
    _add_synth_trace(commands)
    _add_trace(commands)
    _add_bench(commands)
    add_serve_parser(commands)
    add_worker_parser(commands)
    add_gateway_parser(commands)
    return parser


# -- das simulate --------------------------------------------------------------------------


def _add_simulate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    default = DrafterConfig()
    sim = commands.add_parser(
        "simulate",
        help="replay a rollout trace through the drafter and a speculation policy",
        description="Replay a rollout trace epoch by epoch (each epoch one batch) and report "
        "the modeled makespan against no speculation. Default cost model: SmolLM2-135M decode "
        f"steps on this CPU, c_base {SMOLLM2_CPU.c_base} s + c_tok {SMOLLM2_CPU.c_tok} s/token.",
    )
    sim.add_argument("--trace", required=True, help="JSON-lines rollout trace")
    sim.add_argument(
        "--policy",
        default=("das",),
        type=policy_specs,
        help="das, das-rate, das-eq7, fixed:K, suffix or none, or several comma-separated "
        "(replayed one after another, then a side-by-side table; the JSON then holds a list of "
        "runs); with --cost-curve, das/line (any das policy) plans with the line instead of "
        "the curve (default: das)",
    )
    cost_help = (Settings.model_fields["cost_model"].description or "").replace("%", "%%")
    sim.add_argument(
        "--cost-model",
        default=None,
        type=_replay_cost_model,
        metavar="COST_MODEL",
        help=f"{cost_help}; calibrate needs an engine, so not here (default smollm2-cpu, or "
        "with --cost-curve the file's fitted line)",
    )
    sim.add_argument(
        "--cost-curve",
        default=None,
        metavar="JSON",
        help="price each step by the cost curve of a calibration (a das bench rollout JSON, "
        "or its config.cost_model object): the line for the step's batch size; das plans with "
        "it too (das/line: with the cost model's line)",
    )
    sim.add_argument(
        "--c-base", type=seconds, default=None, help="seconds per forward pass (overrides)"
    )
    sim.add_argument(
        "--c-tok", type=seconds, default=None, help="seconds per token in one (overrides)"
    )
    sim.add_argument("--json", dest="json_out", default=None, help="also write results here")
    sim.add_argument("--max-depth", type=int, default=default.max_depth, help="suffix tree depth")
    sim.add_argument("--window", type=int, default=default.window, help="policy versions kept")
    sim.add_argument(
        "--min-prob", type=float, default=default.min_prob, help="draft path probability floor"
    )
    sim.add_argument("--tree-drafts", action="store_true", help="tree drafts instead of chains")
    sim.add_argument(
        "--live-siblings",
        action=argparse.BooleanOptionalAction,
        default=default.live_siblings,
        help="a group's tree also holds its running rollouts' outputs so far",
    )
    sim.add_argument(
        "--other-groups",
        action=argparse.BooleanOptionalAction,
        default=default.other_groups,
        help="where the group's and the rollout's own text match nothing, draft from every "
        "group's rollouts",
    )
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.set_defaults(handler=_simulate, command_parser=sim)


def policy_specs(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated distinct policy names (das/line too), canonical."""
    try:
        specs = tuple(canonical_mode(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if len(set(specs)) != len(specs):
        raise argparse.ArgumentTypeError(f"policies must be distinct, got {text!r}")
    if any(spec.endswith(STARTUP_PRICED) for spec in specs):
        raise argparse.ArgumentTypeError(
            f"{STARTUP_PRICED} is for das bench rollout: a replay's steps cost what the cost "
            "curve says, so there is nothing to time again"
        )
    return specs


def policy_spec(text: str) -> str:
    """An argparse type: a policy name, canonical."""
    try:
        return str(parse_policy_spec(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _replay_cost_model(text: str) -> CostModel:
    try:
        cost = parse_cost_model(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if cost is None:
        raise argparse.ArgumentTypeError(
            "calibrate times an engine's verify step, and a replay runs none: give a preset "
            "or C_BASE,C_TOK"
        )
    return cost


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _simulate(args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.command_parser
    try:
        config = DrafterConfig(
            max_depth=args.max_depth,
            window=args.window,
            min_prob=args.min_prob,
            tree_drafts=args.tree_drafts,
            live_siblings=args.live_siblings,
            other_groups=args.other_groups,
        )
    except ValueError as error:
        parser.error(str(error))
    curve = None
    given: CostModel = args.cost_model or SMOLLM2_CPU
    if args.cost_curve is not None:
        try:
            line, curve = read_cost_curve(args.cost_curve)
        except OSError as error:
            return fail(f"cannot read cost curve {args.cost_curve}: {reason(error)}")
        except (ValueError, KeyError, TypeError) as error:
            return fail(f"bad cost curve {args.cost_curve}: {error}")
        given = args.cost_model or line
    elif any(pricing == "line" for _, pricing in map(mode_policy, args.policy)):
        parser.error("das/line needs --cost-curve")
    cost = CostModel(
        given.c_base if args.c_base is None else args.c_base,
        given.c_tok if args.c_tok is None else args.c_tok,
    )
    try:
        trace = read_trace(args.trace)
    except OSError as error:
        return fail(f"cannot read trace {args.trace}: {reason(error)}")
    except ValueError as error:  # names the file and line
        return fail(f"bad trace: {error}")
    if not trace:
        return fail(f"trace {args.trace} holds no rollouts")
    results = []
    for policy, pricing in map(mode_policy, args.policy):
        results.append(
            simulate(
                trace,
                policy,
                cost,
                config,
                progress=not args.no_progress,
                cost_curve=curve,
                price_by_curve=pricing != "line",
            )
        )
    print("\n\n".join(format_result(result) for result in results))
    if len(results) > 1:
        print("\n" + format_side_by_side(results))
    if args.json_out is not None:
        payload = (
            results[0].to_json()
            if len(results) == 1
            else {"runs": [result.to_json() for result in results]}
        )
        try:
            with open(args.json_out, "w", encoding="utf-8") as file:
                json.dump(payload, file, indent=2)
                file.write("\n")
        except OSError as error:
            return fail(f"cannot write {args.json_out}: {reason(error)}")
    return 0


_COLUMNS = (
    ("epoch", 5),
    ("rollouts", 8),
    ("tokens", 8),
    ("steps", 6),
    ("forwards", 8),
    ("acc/fwd", 7),
    ("tok/fwd", 7),
    ("makespan_s", 10),
    ("baseline_s", 10),
    ("ratio", 6),
)


def policy_label(result: SimulationResult) -> str:
    """The policy as --policy names it: das/line where a curve timed the steps but das
    planned with the line."""
    by_line = result.cost_curve is not None and not result.priced_by_curve
    if by_line and result.policy.startswith("das"):
        return result.policy + LINE_PRICED
    return result.policy


def format_result(result: SimulationResult) -> str:
    """The per-epoch table `das simulate` prints."""
    cost = result.cost
    label = "SYNTHETIC trace" if result.synthetic else "trace"
    peer = result.suffix_decoding
    if peer is None:
        drafter = (
            f"max_depth {result.config.max_depth}, window {result.config.window}, "
            f"{'tree' if result.config.tree_drafts else 'chain'} drafts"
            f"{', live siblings' if result.config.live_siblings else ''}"
            f"{', other groups' if result.config.other_groups else ''}"
        )
    else:  # the drafter knobs do not apply: suffix decoding drafts from its own cache
        drafter = (
            f"global cache of {peer.max_cached_requests} responses, depth {peer.max_depth}, "
            f"{peer.max_spec_tokens} tokens, spec factor {peer.spec_factor}, "
            f"min prob {peer.min_prob}"
        )
    if result.cost_curve is None:
        priced = (
            f"cost model c_base {cost.c_base * 1e3:.1f} ms + c_tok {cost.c_tok * 1e3:.2f} ms/token"
        )
    else:
        rows = ", ".join(str(count) for count, _ in result.cost_curve.points)
        priced = f"steps priced by a cost curve (rows {rows})"
    lines = [
        f"policy {policy_label(result)} | {label} | {priced} | {drafter}",
        "  ".join(f"{name:>{width}}" for name, width in _COLUMNS),
    ]
    for report in (*result.epochs, result.total):
        lines.append(_row(report))
    lines.append(
        "acc/fwd: accepted draft tokens per rollout forward pass; ratio: modeled makespan / "
        "makespan without speculation"
    )
    return "\n".join(lines)


def format_side_by_side(results: Sequence[SimulationResult]) -> str:
    """Every policy's makespan ratio per epoch and over all epochs, one row per policy."""
    epochs = [report.epoch for report in results[0].epochs]
    width = max(8, *(len(policy_label(result)) for result in results))
    header = [f"{'policy':<{width}}", *(f"{f'ep {e}':>6}" for e in epochs), "   all", "tok/fwd"]
    lines = ["side by side: modeled makespan / makespan without speculation", "  ".join(header)]
    for result in results:
        cells = [f"{policy_label(result):<{width}}"]
        cells += [f"{report.makespan_ratio:>6.3f}" for report in result.epochs]
        total = result.total
        cells += [f"{total.makespan_ratio:>6.3f}", f"{total.tokens_per_forward:>7.2f}"]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _row(report: EpochReport) -> str:
    cells = (
        "all" if report.epoch is None else str(report.epoch),
        str(report.rollouts),
        str(report.tokens),
        str(report.steps),
        str(report.forwards),
        f"{report.accepted_per_forward:.2f}",
        f"{report.tokens_per_forward:.2f}",
        f"{report.makespan_s:.1f}",
        f"{report.baseline_s:.1f}",
        f"{report.makespan_ratio:.3f}",
    )
    return "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, _COLUMNS, strict=True))


# -- das synth-trace -----------------------------------------------------------------------


def _add_synth_trace(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    synth = commands.add_parser(
        "synth-trace",
        help="write a synthetic (labelled) rollout trace",
        description="Write a SYNTHETIC rollout trace (every line is marked synthetic): prompt "
        "groups whose rollouts mix a few drifting template solution paths, long-tailed lengths.",
    )
    synth.add_argument("--out", required=True, help="JSON-lines file to write")
    synth.add_argument("--groups", type=positive, default=8, help="prompt groups (default 8)")
    synth.add_argument("--samples", type=positive, default=8, help="rollouts per group/epoch")
    synth.add_argument("--epochs", type=positive, default=6, help="epochs (default 6)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(handler=_synth_trace, command_parser=synth)


def positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _synth_trace(args: argparse.Namespace) -> int:
    records = synthetic_trace(args.groups, args.samples, args.epochs, args.seed)
    try:
        count = write_trace(args.out, records)
    except OSError as error:
        return fail(f"cannot write {args.out}: {reason(error)}")
    tokens = sum(len(record.output) for record in records)
    print(
        f"wrote {count} SYNTHETIC rollouts ({args.groups} groups x {args.samples} samples x "
        f"{args.epochs} epochs, {tokens} output tokens, seed {args.seed}) to {args.out}"
    )
    return 0


# -- das trace and das bench rollout: bench/cli.py ------------------------------------------


def _add_trace(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # add_help=False: --help, like every other argument, is bench/cli.py's to answer.
    trace = commands.add_parser(
        "trace",
        add_help=False,
        help="record a rollout trace on the embedded engine, for das simulate (a checkout's "
        "bench/; --help for its flags)",
    )
    trace.set_defaults(forward=_forward("das", "trace"))


def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench", help="benchmarks on the embedded engine (a checkout's bench/)"
    )
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    rollout = kinds.add_parser(
        "rollout",
        add_help=False,
        help="RL rollout makespan per epoch under each speculation mode (--help for its flags)",
    )
    rollout.set_defaults(forward=_forward("das bench", "rollout"))


def _forward(prog: str, command: str) -> Forward:
    """`prog command ARGS`, run by bench/cli.py."""

    def run(argv: list[str]) -> int:
        try:
            from bench.cli import main as bench_main
        except ModuleNotFoundError as error:
            if error.name not in ("bench", "bench.cli"):
                raise
            return fail(
                f"`{prog} {command}` runs bench/ of a repository checkout, which this "
                f"installation lacks: run `python -m bench.cli {command} ...` in a checkout"
            )
        return bench_main([command, *argv], prog=prog)

    return run


# -- errors --------------------------------------------------------------------------------


def reason(error: BaseException) -> str:
    """Why an OSError happened, without its errno and path."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def fail(message: str) -> int:
    """Print the one-line error and return exit status 1."""
    print(f"das: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
