"""The `das` command line.

    das simulate --trace T.jsonl [--policy das|das-eq7|fixed:K|none] [--c-base S --c-tok S]
                 [--json OUT] [--max-depth D --window W]
    das synth-trace --out T.jsonl [--groups G --samples N --epochs E --seed S]
    das trace --out T.jsonl [--model M --prompts P --samples N --epochs E --temperature T
              --max-tokens M --seed S --policy none|fixed:K|das --max-batch B]
    das bench rollout [--model M --prompts P --samples N --epochs E --max-tokens T
                      --temperature X --modes none,fixed:8,das --json OUT --plot OUT.png
                      --trace OUT.jsonl --max-batch B --cost calibrate|smollm2-cpu]
    das serve | worker | gateway ...   (see service/commands.py)

Each subcommand adds its parser in build_parser and sets `handler`, a function of the parsed
arguments that returns the exit status (serve, worker and gateway: see service/commands.py).
`trace` and `bench` import the engine only when they run.
Bad arguments exit 2 (argparse); a file that cannot be read or written exits 1 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from drafter.config import DrafterConfig
from drafter.cost import SMOLLM2_CPU, CostModel
from drafter.policy_spec import parse_policy_spec
from drafter.simulator import EpochReport, SimulationResult, simulate
from drafter.traces import read_trace, synthetic_trace, write_trace
from service.commands import add_gateway_parser, add_serve_parser, add_worker_parser

if TYPE_CHECKING:
    from service.engine.bench import RolloutConfig

# `das trace` and `das bench` import the engine (torch, transformers: seconds) only when they
# run, so the other subcommands start fast; tests check these equal the engine's own.
SMOLLM2 = "smollm2-135m"
DEFAULT_MODES = ("none", "fixed:8", "das")
COST_SOURCES = ("calibrate", "smollm2-cpu")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        default="das",
        type=_policy_spec,
        help="das, das-eq7, fixed:K or none (default: das)",
    )
    sim.add_argument("--c-base", type=_seconds, default=None, help="seconds per forward pass")
    sim.add_argument("--c-tok", type=_seconds, default=None, help="seconds per token in one")
    sim.add_argument("--json", dest="json_out", default=None, help="also write results here")
    sim.add_argument("--max-depth", type=int, default=default.max_depth, help="suffix tree depth")
    sim.add_argument("--window", type=int, default=default.window, help="policy versions kept")
    sim.add_argument(
        "--min-prob", type=float, default=default.min_prob, help="draft path probability floor"
    )
    sim.add_argument("--tree-drafts", action="store_true", help="tree drafts instead of chains")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.set_defaults(handler=_simulate, command_parser=sim)


def _policy_spec(text: str) -> str:
    try:
        return str(parse_policy_spec(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds(text: str) -> float:
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
        )
    except ValueError as error:
        parser.error(str(error))
    cost = CostModel(
        SMOLLM2_CPU.c_base if args.c_base is None else args.c_base,
        SMOLLM2_CPU.c_tok if args.c_tok is None else args.c_tok,
    )
    try:
        trace = read_trace(args.trace)
    except OSError as error:
        return _fail(f"cannot read trace {args.trace}: {_reason(error)}")
    except ValueError as error:  # names the file and line
        return _fail(f"bad trace: {error}")
    if not trace:
        return _fail(f"trace {args.trace} holds no rollouts")
    result = simulate(trace, args.policy, cost, config, progress=not args.no_progress)
    print(format_result(result))
    if args.json_out is not None:
        try:
            with open(args.json_out, "w", encoding="utf-8") as file:
                json.dump(result.to_json(), file, indent=2)
                file.write("\n")
        except OSError as error:
            return _fail(f"cannot write {args.json_out}: {_reason(error)}")
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


def format_result(result: SimulationResult) -> str:
    """The per-epoch table `das simulate` prints."""
    cost = result.cost
    label = "SYNTHETIC trace" if result.synthetic else "trace"
    lines = [
        f"policy {result.policy} | {label} | cost model c_base {cost.c_base * 1e3:.1f} ms + "
        f"c_tok {cost.c_tok * 1e3:.2f} ms/token | max_depth {result.config.max_depth}, "
        f"window {result.config.window}, {'tree' if result.config.tree_drafts else 'chain'} "
        "drafts",
        "  ".join(f"{name:>{width}}" for name, width in _COLUMNS),
    ]
    for report in (*result.epochs, result.total):
        lines.append(_row(report))
    lines.append(
        "acc/fwd: accepted draft tokens per rollout forward pass; ratio: modeled makespan / "
        "makespan without speculation"
    )
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
    synth.add_argument("--groups", type=_positive, default=8, help="prompt groups (default 8)")
    synth.add_argument("--samples", type=_positive, default=8, help="rollouts per group/epoch")
    synth.add_argument("--epochs", type=_positive, default=6, help="epochs (default 6)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(handler=_synth_trace, command_parser=synth)


def _positive(text: str) -> int:
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
        return _fail(f"cannot write {args.out}: {_reason(error)}")
    tokens = sum(len(record.output) for record in records)
    print(
        f"wrote {count} SYNTHETIC rollouts ({args.groups} groups x {args.samples} samples x "
        f"{args.epochs} epochs, {tokens} output tokens, seed {args.seed}) to {args.out}"
    )
    return 0


# -- das trace and das bench rollout -------------------------------------------------------


def _rollout_flags(parser: argparse.ArgumentParser, samples: int, epochs: int) -> None:
    """The workload flags `das trace` and `das bench rollout` share."""
    parser.add_argument(
        "--model", default=SMOLLM2, help=f"model name, directory or .gguf (default {SMOLLM2})"
    )
    parser.add_argument(
        "--prompts",
        default="math",
        type=_prompt_spec,
        help="math, code, math:N, code:N (builtin sets, 8 prompts by default) or a file: JSON "
        'lines of {"prompt": ...} or {"messages": [...]}, or one prompt per line '
        "(default: math)",
    )
    parser.add_argument(
        "--samples", type=_positive, default=samples, help=f"rollouts per prompt ({samples})"
    )
    parser.add_argument("--epochs", type=_positive, default=epochs, help=f"epochs ({epochs})")
    parser.add_argument(
        "--max-tokens", type=_positive, default=512, help="output tokens per rollout (512)"
    )
    parser.add_argument(
        "--temperature", type=_temperature, default=0.7, help="0 is greedy (default 0.7)"
    )
    parser.add_argument("--seed", type=_seed, default=0, help="workload seed (default 0)")
    parser.add_argument(
        "--max-batch",
        type=_positive,
        default=None,
        help="rollouts decoding at once (default: all of an epoch's)",
    )
    parser.add_argument(
        "--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_trace(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    trace = commands.add_parser(
        "trace",
        help="record a rollout trace on the embedded engine (for das simulate)",
        description="Run P prompts x N samples per epoch on the embedded engine, each epoch "
        "submitted at once with its own seeds, and write every rollout (group, epoch, prompt "
        "and output token ids) as a JSON-lines trace for `das simulate`.",
    )
    trace.add_argument("--out", required=True, help="JSON-lines trace to write")
    _rollout_flags(trace, samples=4, epochs=4)
    trace.add_argument(
        "--policy",
        default="none",
        type=_policy_spec,
        help="speculation while recording: none, fixed:K, das or das-eq7; the tokens are the same "
        "(default none)",
    )
    trace.set_defaults(handler=_trace, command_parser=trace)


def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser("bench", help="benchmarks on the embedded engine")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    rollout = kinds.add_parser(
        "rollout",
        help="RL rollout makespan per epoch under each speculation mode",
        description="Each mode (none first: the reference) has its own engine and history "
        "and runs every epoch, the modes taking turns epoch by epoch; each epoch's prompts x "
        "samples are submitted at once as one RL step. "
        "Reports makespan, tokens per forward, acceptance, tokens/s and the batch size over "
        "time per epoch, and the rollouts whose tokens differ from none's (must be 0).",
    )
    _rollout_flags(rollout, samples=4, epochs=4)
    rollout.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        type=_modes,
        help=f"comma-separated policies (default {','.join(DEFAULT_MODES)})",
    )
    rollout.add_argument(
        "--cost",
        choices=COST_SOURCES,
        default="calibrate",
        help="das's cost model: calibrate (time verify steps at start-up; default) or "
        "smollm2-cpu (the figures in DESIGN.md)",
    )
    rollout.add_argument("--json", dest="json_out", default=None, help="write results here")
    rollout.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    rollout.add_argument(
        "--trace", dest="trace_out", default=None, help="write the reference run's trace here"
    )
    rollout.set_defaults(handler=_bench_rollout, command_parser=rollout)


def _prompt_spec(text: str) -> str:
    from service.engine.prompts import check_prompt_spec

    try:
        return check_prompt_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 2], got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(_policy_spec(part) for part in text.split(","))
    if len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"modes must be distinct, got {text!r}")
    return modes


def _rollout_config(args: argparse.Namespace, modes: tuple[str, ...], cost: str) -> RolloutConfig:
    from service.engine.bench import RolloutConfig

    return RolloutConfig(
        model=args.model,
        prompts=args.prompts,
        samples=args.samples,
        epochs=args.epochs,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        modes=modes,
        max_batch=args.max_batch,
        cost=cost,
    )


def _load(args: argparse.Namespace, config: RolloutConfig) -> tuple[Any, Any] | None:
    """(model, tokenizer), or None after printing why the model or prompts cannot be used."""
    import torch

    from service.engine.models import load_model
    from service.engine.prompts import load_prompts

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        load_prompts(config.prompts, config.seed)  # fail on a bad prompt file before loading
    except OSError as error:
        _fail(f"cannot read prompts {config.prompts}: {_reason(error)}")
        return None
    except ValueError as error:
        _fail(f"bad prompts: {error}")
        return None
    try:
        return load_model(config.model)
    except (ValueError, OSError) as error:
        _fail(f"cannot load model {config.model}: {_reason(error)}")
        return None


def _progress_bar(total: int, args: argparse.Namespace, description: str) -> tqdm:
    # disable=None: tqdm draws only on a terminal.
    return tqdm(
        total=total,
        unit="rollout",
        desc=description,
        disable=True if args.no_progress else None,
        leave=False,
    )


def _trace(args: argparse.Namespace) -> int:
    from service.engine.bench import record_trace
    from service.engine.prompts import load_prompts

    config = _rollout_config(args, (args.policy,), "smollm2-cpu")
    loaded = _load(args, config)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    count = len(load_prompts(config.prompts, config.seed))
    total = count * config.samples * config.epochs
    try:
        with _progress_bar(total, args, f"trace {args.policy}") as bar:
            records, runs = record_trace(config, model, tokenizer, bar.update)
    except ValueError as error:  # a prompt too long for the model, say
        return _fail(str(error))
    try:
        written = write_trace(args.out, records)
    except OSError as error:
        return _fail(f"cannot write {args.out}: {_reason(error)}")
    tokens = sum(len(record.output) for record in records)
    seconds = sum(run.makespan_s for run in runs)
    print(
        f"wrote {written} rollouts ({count} prompts x {config.samples} samples x "
        f"{config.epochs} epochs, {tokens} output tokens in {seconds:.1f} s, model "
        f"{config.model}, seed {config.seed}) to {args.out}"
    )
    return 0


def _bench_rollout(args: argparse.Namespace) -> int:
    from service.engine.bench import format_table, run_bench, trace_records, write_plot
    from service.engine.prompts import load_prompts

    config = _rollout_config(args, args.modes, args.cost)
    for path in (args.json_out, args.plot, args.trace_out):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return _fail(f"cannot write {path}: no such directory")
    loaded = _load(args, config)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    count = len(load_prompts(config.prompts, config.seed))
    total = count * config.samples * config.epochs * len(config.modes)
    try:
        with _progress_bar(total, args, "bench rollout") as bar:
            result = run_bench(
                config,
                model,
                tokenizer,
                bar.update,
                on_calibrated=lambda c: bar.set_description(
                    f"bench rollout (c_base {c.cost.c_base * 1e3:.1f} ms, "
                    f"c_tok {c.cost.c_tok * 1e3:.3f} ms)"
                ),
            )
    except ValueError as error:
        return _fail(str(error))
    print(format_table(result))
    try:
        if args.json_out is not None:
            with open(args.json_out, "w", encoding="utf-8") as file:
                json.dump(result.to_json(), file, indent=2)
                file.write("\n")
        if args.trace_out is not None:
            reference = result.runs_of(config.ordered_modes[0])
            write_trace(args.trace_out, trace_records(reference, result.workload))
        if args.plot is not None:
            write_plot(result, args.plot)
    except OSError as error:
        return _fail(f"cannot write results: {_reason(error)}")
    return 0


# -- errors --------------------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def _fail(message: str) -> int:
    print(f"das: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
