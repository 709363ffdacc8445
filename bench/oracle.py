"""How far any history drafter could go on a trace: the makespan of an oracle drafter.

    python -m bench.oracle --trace T.jsonl [--max-draft 16] [--context 2] [--live-siblings]
                           [--other-groups] [--cost-curve BENCH.json] [--json OUT]

At every step each live rollout drafts exactly the longest correct run of its next tokens (at
most --max-draft) that occurs, right after the rollout's last --context tokens, somewhere in
what a history drafter can see: its group's rollouts of earlier epochs and those of its own
epoch that have finished (prompt and output), with --live-siblings the outputs so far of
those still running (as the drafter's live_siblings), with --other-groups every other group's
rollouts of earlier epochs and finished ones of its own (as the drafter's other_groups, which
drafts from them only where nothing else matches), its own prompt and its own output so far. It
knows the future, so it is never rejected and never drafts a token in vain; a real drafter
picks one continuation without knowing which is right. Each epoch is one batch, all rollouts
decoding in lockstep. Reports per epoch the oracle's steps against the longest rollout's
length (the makespan ratio when verifying drafts is free, the limit a GPU cost model
approaches) and the modeled makespan ratio under --c-base/--c-tok (or --cost-curve: each step
under the line of a calibration's cost curve for its batch size), where the oracle's drafts
are priced like any others. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from drafter.cost import H100_7B, CostCurve, CostModel, read_cost_curve
from drafter.simulator import baseline_time
from drafter.traces import TraceRecord, read_trace

DEFAULT_JSON = Path(__file__).parent / "results" / "oracle.json"
_SEPARATOR = "\x00"  # between sequences; token t is chr(t + 1), never chr(0)


def _text(tokens: Sequence[int]) -> str:
    return "".join(chr(token + 1) for token in tokens)


def _longest_run(corpus: str, full: str, at: int, limit: int, context: int) -> int:
    """The most tokens of full[at:] (at most limit) that occur in corpus right after the
    context tokens before `at`. Occurrence is monotone in the run's length (a prefix occurs
    wherever the run does), so bisect it."""
    anchor = full[max(0, at - context) : at]
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        if anchor + full[at : at + middle] in corpus:
            low = middle
        else:
            high = middle - 1
    return low


def oracle_batch(
    batch: Sequence[TraceRecord],
    earlier: Mapping[str, Sequence[Sequence[int]]],
    max_draft: int,
    context: int,
    live_siblings: bool = False,
    other_groups: bool = False,
) -> list[list[int]]:
    """The oracle's accepted draft tokens at each step of each rollout of one batch (module
    docstring), all decoding in lockstep: one entry per step, each emitting run + 1 tokens.
    earlier: per group, the token sequences its drafts may copy (earlier epochs' prompt and
    output); a rollout joins its group's as soon as it finishes, as in the engine, and with
    live_siblings its running siblings' outputs so far are visible too (as at the step's start),
    with other_groups every group's sequences."""
    if max_draft < 0 or context < 1:
        raise ValueError("need max_draft >= 0 and context >= 1")
    seen = {group: [_text(tokens) for tokens in sequences] for group, sequences in earlier.items()}
    fulls = [_text([*record.prompt, *record.output]) for record in batch]
    positions = [0] * len(batch)
    runs: list[list[int]] = [[] for _ in batch]
    live = list(range(len(batch)))
    while live:
        finished = []
        # What each running rollout shows its siblings: its prompt and output at the step's start.
        shown = {j: fulls[j][: len(batch[j].prompt) + positions[j]] for j in live}
        everyone = [text for texts in seen.values() for text in texts] if other_groups else []
        for i in live:
            record, full = batch[i], fulls[i]
            at = len(record.prompt) + positions[i]
            siblings = [
                shown[j]
                for j in live
                if live_siblings and j != i and batch[j].group == record.group
            ]
            stored = everyone if other_groups else seen.get(record.group, [])
            corpus = _SEPARATOR.join([*stored, *siblings, full[:at]])
            left = len(record.output) - positions[i] - 1  # the target's own token comes last
            run = _longest_run(corpus, full, at, min(max_draft, left), context)
            runs[i].append(run)
            positions[i] += run + 1
            if positions[i] == len(record.output):
                finished.append(i)
        for i in finished:
            seen.setdefault(batch[i].group, []).append(fulls[i])
        live = [i for i in live if i not in finished]
    return runs


def oracle_epochs(
    trace: Sequence[TraceRecord],
    max_draft: int,
    context: int,
    cost: CostModel,
    live_siblings: bool = False,
    curve: CostCurve | None = None,
    other_groups: bool = False,
) -> list[dict[str, float | int]]:
    """Per epoch: rollouts, longest length, oracle steps, tokens per forward, accepted draft
    tokens and the modeled makespan ratio under cost (oracle drafts on every row, priced c_tok
    each), or with a cost curve under its line for each step's batch size."""
    epochs = []
    for epoch in sorted({record.epoch for record in trace}):
        batch = [record for record in trace if record.epoch == epoch]
        earlier: dict[str, list[Sequence[int]]] = {}
        for record in trace:
            if record.epoch < epoch:
                earlier.setdefault(record.group, []).append([*record.prompt, *record.output])
        all_runs = oracle_batch(batch, earlier, max_draft, context, live_siblings, other_groups)
        steps = max(len(runs) for runs in all_runs)
        lengths = [len(record.output) for record in batch]
        if curve is None:
            # An oracle draft is never rejected: every verified token is an output token.
            makespan = cost.c_base * steps + cost.c_tok * sum(lengths)
        else:
            makespan = 0.0
            for step in range(steps):
                live = [runs[step] + 1 for runs in all_runs if len(runs) > step]
                makespan += curve.step_seconds(len(live), sum(live))
        epochs.append(
            {
                "epoch": epoch,
                "rollouts": len(batch),
                "longest": max(lengths),
                "steps": steps,
                "steps_ratio": steps / max(lengths),
                "tokens_per_forward": sum(lengths) / sum(len(runs) for runs in all_runs),
                "accepted": sum(sum(runs) for runs in all_runs),  # draft tokens, all rollouts
                "makespan_ratio": makespan / baseline_time(lengths, cost, curve),
            }
        )
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, required=True, help="JSON-lines rollout trace")
    parser.add_argument("--max-draft", type=int, default=16, help="most tokens per draft")
    parser.add_argument("--context", type=int, default=2, help="tokens the run must follow")
    parser.add_argument(
        "--live-siblings", action="store_true", help="running siblings' outputs are visible"
    )
    parser.add_argument(
        "--other-groups", action="store_true", help="every group's rollouts are visible"
    )
    parser.add_argument("--c-base", type=float, default=H100_7B.c_base, help="s per step")
    parser.add_argument("--c-tok", type=float, default=H100_7B.c_tok, help="s per token")
    parser.add_argument(
        "--cost-curve",
        default=None,
        metavar="JSON",
        help="price each step by a calibration's cost curve (a das bench rollout JSON) instead",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args()
    cost = CostModel(args.c_base, args.c_tok)
    curve = None if args.cost_curve is None else read_cost_curve(args.cost_curve)[1]
    epochs = oracle_epochs(
        read_trace(args.trace),
        args.max_draft,
        args.context,
        cost,
        args.live_siblings,
        curve,
        args.other_groups,
    )
    priced = f"cost c_base {cost.c_base * 1e3:g} ms + c_tok {cost.c_tok * 1e3:g} ms"
    if curve is not None:
        priced = f"steps priced by the cost curve of {args.cost_curve}"
    print(
        f"oracle drafter on {args.trace}: runs of <= {args.max_draft} tokens after a "
        f"{args.context}-token match{', live siblings' if args.live_siblings else ''}"
        f"{', other groups' if args.other_groups else ''}; {priced}"
    )
    print(
        "| epoch | longest | oracle steps | steps ratio | tokens/forward | accepted "
        "| makespan ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for e in epochs:
        print(
            f"| {e['epoch']} | {e['longest']} | {e['steps']} | {e['steps_ratio']:.3f} "
            f"| {e['tokens_per_forward']:.2f} | {e['accepted']} | {e['makespan_ratio']:.3f} |"
        )
    steps, longest = sum(e["steps"] for e in epochs), sum(e["longest"] for e in epochs)
    print(f"all epochs: steps ratio {steps / longest:.3f}")
    payload = {
        "trace": str(args.trace),
        "max_draft": args.max_draft,
        "context": args.context,
        "live_siblings": args.live_siblings,
        "other_groups": args.other_groups,
        "cost_model": cost.to_json(),
        "cost_curve": args.cost_curve,
        "epochs": epochs,
        "steps_ratio": steps / longest,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
