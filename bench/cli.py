"""The command lines of `das trace` and `das bench rollout`, which service/cli.py hands on here.

    das trace --out T.jsonl [--model M --prompts P --samples N --epochs E --temperature T
              --max-tokens M --seed S --policy none|fixed:K|das --max-batch B]
    das bench rollout [--model M --prompts P --samples N --epochs E --max-tokens T
                      --temperature X --modes none,fixed:8,das --json OUT --plot OUT.png
                      --trace OUT.jsonl --max-batch B
                      --cost-model calibrate|smollm2-cpu|h100-7b|C_BASE,C_TOK]

From a checkout without `das` installed in editable mode: `python -m bench.cli trace ...` and
`python -m bench.cli rollout ...`. The defaults are RolloutConfig's. Bad arguments exit 2; a
model, prompt file or output that cannot be used exits 1 with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from bench.prompts import check_prompt_spec, load_prompts
from bench.rollout import (
    RolloutConfig,
    format_table,
    record_trace,
    run_bench,
    trace_records,
    write_plot,
)
from drafter.cost import parse_cost_model
from drafter.policy_spec import canonical_mode
from drafter.traces import write_trace
from service.cli import fail, policy_spec, positive, reason
from service.settings import Settings

DEFAULTS = RolloutConfig()


def main(argv: Sequence[str] | None = None, prog: str = "python -m bench.cli") -> int:
    args = build_parser(prog).parse_args(argv)
    status: int = args.handler(args)
    return status


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Rollouts on the embedded engine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_trace(commands)
    _add_rollout(commands)
    return parser


def _rollout_flags(parser: argparse.ArgumentParser) -> None:
    """The workload flags `das trace` and `das bench rollout` share."""
    parser.add_argument(
        "--model",
        default=DEFAULTS.model,
        help=f"model name, directory or .gguf (default {DEFAULTS.model})",
    )
    parser.add_argument(
        "--prompts",
        default=DEFAULTS.prompts,
        type=_prompt_spec,
        help="math, code, math:N, code:N (builtin sets, 8 prompts by default) or a file: JSON "
        'lines of {"prompt": ...} or {"messages": [...]}, or one prompt per line '
        f"(default: {DEFAULTS.prompts})",
    )
    parser.add_argument(
        "--samples",
        type=positive,
        default=DEFAULTS.samples,
        help=f"rollouts per prompt ({DEFAULTS.samples})",
    )
    parser.add_argument(
        "--epochs", type=positive, default=DEFAULTS.epochs, help=f"epochs ({DEFAULTS.epochs})"
    )
    parser.add_argument(
        "--max-tokens",
        type=positive,
        default=DEFAULTS.max_tokens,
        help=f"output tokens per rollout ({DEFAULTS.max_tokens})",
    )
    parser.add_argument(
        "--temperature",
        type=_temperature,
        default=DEFAULTS.temperature,
        help=f"0 is greedy (default {DEFAULTS.temperature})",
    )
    parser.add_argument(
        "--seed", type=_seed, default=DEFAULTS.seed, help=f"workload seed (default {DEFAULTS.seed})"
    )
    parser.add_argument(
        "--max-batch",
        type=positive,
        default=DEFAULTS.max_batch,
        help="rollouts decoding at once (default: all of an epoch's)",
    )
    parser.add_argument(
        "--threads", type=positive, default=None, help="torch CPU threads (default: torch's)"
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
    _rollout_flags(trace)
    trace.add_argument(
        "--policy",
        default="none",
        type=policy_spec,
        help="speculation while recording: none, fixed:K, das, das-rate, das-eq7 or suffix; "
        "the tokens are the same (default none)",
    )
    trace.set_defaults(handler=_trace)


def _add_rollout(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rollout = commands.add_parser(
        "rollout",
        help="RL rollout makespan per epoch under each speculation mode",
        description="Each mode (none first: the reference) has its own engine and history "
        "and runs every epoch, the modes taking turns step by step (a mode's makespan is the "
        "time of its own steps); each epoch's prompts x samples are submitted at once as one "
        "RL step. Reports makespan, tokens per forward, acceptance, tokens/s and the batch "
        "size over time per epoch, and the rollouts whose tokens differ from none's (must be "
        "0).",
    )
    _rollout_flags(rollout)
    modes = ",".join(DEFAULTS.modes)
    rollout.add_argument(
        "--modes",
        default=DEFAULTS.modes,
        type=_modes,
        help=f"comma-separated policies (default {modes}); with --cost-model calibrate a das "
        "policy prices each step by the calibrated curve for its batch size as the steps it "
        "times correct it; das/startup (any das policy) by the curve as calibrated, das/line by "
        "the one line fitted over all batch sizes",
    )
    help_text = Settings.model_fields["cost_model"].description or ""
    rollout.add_argument(
        "--cost-model",
        "--cost",
        dest="cost",
        default=DEFAULTS.cost,
        type=_cost_model,
        metavar="COST_MODEL",
        help=f"das's cost model: {help_text.replace('%', '%%')} (default {DEFAULTS.cost})",
    )
    rollout.add_argument(
        "--tree-drafts", action="store_true", help="every mode drafts best-first trees"
    )
    rollout.add_argument(
        "--live-siblings",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.live_siblings,
        help="every mode also drafts from its running siblings' outputs so far",
    )
    rollout.add_argument(
        "--other-groups",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS.other_groups,
        help="where a rollout's group and own text match nothing, das drafts from every "
        "group's rollouts",
    )
    rollout.add_argument("--json", dest="json_out", default=None, help="write results here")
    rollout.add_argument("--plot", default=None, help="write a PNG plot here (needs matplotlib)")
    rollout.add_argument(
        "--trace", dest="trace_out", default=None, help="write the reference run's trace here"
    )
    rollout.set_defaults(handler=_bench_rollout)


def _prompt_spec(text: str) -> str:
    try:
        return check_prompt_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _cost_model(text: str) -> str:
    try:
        parse_cost_model(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip().lower()


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
    try:
        modes = tuple(canonical_mode(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"modes must be distinct, got {text!r}")
    return modes


def _rollout_config(args: argparse.Namespace, modes: tuple[str, ...], cost: str) -> RolloutConfig:
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
        # `das trace` records the no-speculation run only: it has neither flag.
        tree_drafts=getattr(args, "tree_drafts", False),
        live_siblings=getattr(args, "live_siblings", DEFAULTS.live_siblings),
        other_groups=getattr(args, "other_groups", DEFAULTS.other_groups),
    )


def _load(args: argparse.Namespace, config: RolloutConfig) -> tuple[Any, Any] | None:
    """(model, tokenizer), or None after printing why the model or prompts cannot be used."""
    import torch

    from service.engine.models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        load_prompts(config.prompts, config.seed)  # fail on a bad prompt file before loading
    except OSError as error:
        fail(f"cannot read prompts {config.prompts}: {reason(error)}")
        return None
    except ValueError as error:
        fail(f"bad prompts: {error}")
        return None
    try:
        return load_model(config.model)
    except (ValueError, OSError) as error:
        fail(f"cannot load model {config.model}: {reason(error)}")
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
    # Recording prices nothing: the cost model only steers how much das drafts.
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
        return fail(str(error))
    try:
        written = write_trace(args.out, records)
    except OSError as error:
        return fail(f"cannot write {args.out}: {reason(error)}")
    tokens = sum(len(record.output) for record in records)
    seconds = sum(run.makespan_s for run in runs)
    print(
        f"wrote {written} rollouts ({count} prompts x {config.samples} samples x "
        f"{config.epochs} epochs, {tokens} output tokens in {seconds:.1f} s, model "
        f"{config.model}, seed {config.seed}) to {args.out}"
    )
    return 0


def _bench_rollout(args: argparse.Namespace) -> int:
    config = _rollout_config(args, args.modes, args.cost)
    for path in (args.json_out, args.plot, args.trace_out):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return fail(f"cannot write {path}: no such directory")
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
        return fail(str(error))
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
        return fail(f"cannot write results: {reason(error)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
