"""Offline simulator: replay a rollout trace through the drafter and a speculation policy.

Each epoch of the trace is one batch: its rollouts start together and the batch drains as they
finish. At every step each live rollout gets a budget from the policy (the live batch is every
unfinished rollout) and drafts that many tokens from the RolloutHistory (earlier epochs'
rollouts of its group, plus its own prompt and output so far; under the suffix policy from
suffix decoding's global cache instead, drafter/suffix_decoding.py), all rows in one call
before any is verified, as in the engine (a Trimming policy, das, then cuts the drafts,
again as the speculation core does); then the target "verifies" each draft against the recorded
output: the longest draft path that matches it is accepted and the target adds its own next
token, so a step emits accepted + 1 tokens (never past the recorded end). A step costs
c_base + c_tok * (sum over live rollouts of 1 + draft length) under the cost model, or, given a
cost curve (a calibration's CostCurve), that under the curve's line for the step's live batch,
with a das policy repriced at every step as the speculation core reprices it. A rollout
enters the history (version = epoch) as soon as it finishes, as in the engine, where the
speculation core adds it at once; after the epoch the history moves to version epoch + 1.

Output tokens never change: accepted tokens are the draft's own tokens, checked equal to the
recording, and the simulator can hand back what it emitted (record_outputs) for a test to compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from drafter.config import DrafterConfig
from drafter.cost import CostCurve, CostModel, LiveStepCost
from drafter.das import DasConfig
from drafter.draft import Draft
from drafter.history import RolloutHistory, TreeFactory
from drafter.policy import Policy, RequestView, trimmer
from drafter.policy_spec import parse_policy
from drafter.speculator import DraftSource, draft_source
from drafter.suffix_decoding import SuffixDecodingConfig, SuffixPolicy
from drafter.suffix_tree import SuffixTree
from drafter.traces import TraceRecord


@dataclass(frozen=True, slots=True)
class EpochReport:
    epoch: int | None  # None: the sum over all epochs
    rollouts: int
    tokens: int  # output tokens
    forwards: int  # forward passes each rollout took part in, summed over rollouts
    steps: int  # batch forward passes (decode steps until the last rollout finished)
    drafted: int  # draft tokens verified
    accepted: int  # draft tokens accepted
    makespan_s: float  # modeled time of the batch under the policy
    baseline_s: float  # modeled time of the same batch without speculation

    @property
    def accepted_per_forward(self) -> float:
        return self.accepted / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def makespan_ratio(self) -> float:
        """Makespan relative to no speculation (below 1: faster)."""
        return self.makespan_s / self.baseline_s if self.baseline_s else 1.0

    def to_json(self) -> dict[str, object]:
        return {
            **asdict(self),
            "accepted_per_forward": self.accepted_per_forward,
            "tokens_per_forward": self.tokens_per_forward,
            "makespan_ratio": self.makespan_ratio,
        }


@dataclass(frozen=True, slots=True)
class SimulationResult:
    policy: str
    cost: CostModel
    config: DrafterConfig
    epochs: tuple[EpochReport, ...]
    synthetic: bool  # the trace (or part of it) came from synthetic_trace
    # With record_outputs: every rollout's emitted tokens, in trace order.
    outputs: tuple[tuple[int, ...], ...] | None = field(default=None, repr=False)
    # The suffix policy's own settings (it drafts from its cache; `config` is then unused).
    suffix_decoding: SuffixDecodingConfig | None = None
    # The steps' cost by batch size, if given (then `cost` is what a policy priced by the
    # line plans with), and whether a das policy planned with it.
    cost_curve: CostCurve | None = None
    priced_by_curve: bool = False

    @property
    def total(self) -> EpochReport:
        return EpochReport(
            epoch=None,
            rollouts=sum(e.rollouts for e in self.epochs),
            tokens=sum(e.tokens for e in self.epochs),
            forwards=sum(e.forwards for e in self.epochs),
            steps=sum(e.steps for e in self.epochs),
            drafted=sum(e.drafted for e in self.epochs),
            accepted=sum(e.accepted for e in self.epochs),
            makespan_s=sum(e.makespan_s for e in self.epochs),
            baseline_s=sum(e.baseline_s for e in self.epochs),
        )

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "synthetic": self.synthetic,
            "policy": self.policy,
            "cost_model": self.cost.to_json(),
            "drafter": asdict(self.config),
            "epochs": [epoch.to_json() for epoch in self.epochs],
            "total": self.total.to_json(),
        }
        if self.suffix_decoding is not None:
            data["suffix_decoding"] = asdict(self.suffix_decoding)
        if self.cost_curve is not None:
            data["cost_curve"] = self.cost_curve.to_json()
            data["priced_by_curve"] = self.priced_by_curve
        return data


def accepted_tokens(draft: Draft, target: Sequence[int]) -> list[int]:
    """The draft's tokens along its longest path from the root that equals a prefix of
    target (for a chain: its longest matching prefix)."""
    if draft.is_chain():
        accepted: list[int] = []
        for token, expected in zip(draft.token_ids, target, strict=False):
            if token != expected:
                break
            accepted.append(token)
        return accepted
    children: dict[int, list[int]] = {}
    for index, parent in enumerate(draft.parents):
        children.setdefault(parent, []).append(index)
    path: list[int] = []
    node = -1
    while len(path) < len(target):
        expected = target[len(path)]
        node = next((c for c in children.get(node, ()) if draft.token_ids[c] == expected), -2)
        if node == -2:
            break
        path.append(draft.token_ids[node])
    return path


def baseline_time(lengths: Sequence[int], cost: CostModel, curve: CostCurve | None = None) -> float:
    """Modeled time of a batch without speculation: step s costs c_base + c_tok * (rollouts
    still running), until the longest is done; with a curve, each step under its line for
    the rollouts still running."""
    if not lengths:
        return 0.0
    if curve is None:
        return cost.c_base * max(lengths) + cost.c_tok * sum(lengths)
    ordered = sorted(lengths)
    total, done = 0.0, 0
    for index, length in enumerate(ordered):  # steps done + 1 .. length run len - index rows
        rows = len(ordered) - index
        total += (length - done) * curve.at(rows).step_time(rows)
        done = length
    return total


@dataclass(slots=True)
class _Live:
    index: int  # in the trace; also its request id in the history
    record: TraceRecord
    view: RequestView
    emitted: list[int] | None  # with record_outputs: every token it emitted
    forwards: int = 0


def simulate(
    trace: Sequence[TraceRecord],
    policy_spec: str,
    cost: CostModel,
    config: DrafterConfig | None = None,
    *,
    das_config: DasConfig | None = None,
    tree_factory: TreeFactory = SuffixTree,
    progress: bool = False,
    record_outputs: bool = False,
    cost_curve: CostCurve | None = None,
    price_by_curve: bool = True,
    planner: CostCurve | LiveStepCost | None = None,
) -> SimulationResult:
    """Replay `trace` epoch by epoch under the policy named by policy_spec (module docstring).
    Deterministic. progress: a tqdm bar of finished rollouts on stderr, if it is a terminal.
    cost_curve: steps cost what its line for their batch says, and (unless price_by_curve is
    False, which keeps `cost` for planning) a das policy plans with that line. planner: a
    das policy plans with this curve instead, while cost_curve times the steps (a
    LiveStepCost learns each step's time under cost_curve, as an engine learns its own)."""
    if planner is not None and cost_curve is None:
        raise ValueError("a planner plans steps timed by a cost curve: give cost_curve")
    config = config or DrafterConfig()
    by_curve = cost_curve is not None and price_by_curve and planner is None
    policy = parse_policy(policy_spec, cost, das_config)
    history = RolloutHistory(config, tree_factory=tree_factory)
    source = draft_source(policy, history)
    outputs: list[tuple[int, ...]] = [()] * len(trace)
    reports = []
    # disable=None: tqdm draws only on a terminal.
    bar = tqdm(total=len(trace), unit="rollout", disable=None if progress else True, leave=False)
    with bar:
        for epoch in sorted({record.epoch for record in trace}):
            bar.set_description(f"{policy.name} epoch {epoch}")
            batch = []
            for index, record in enumerate(trace):
                if record.epoch == epoch:
                    source.start_request(index, record.group, record.prompt)
                    view = policy.request(record.group)
                    batch.append(_Live(index, record, view, [] if record_outputs else None))
            reprice: CostCurve | LiveStepCost | None = None
            if policy.cost is not None:
                reprice = planner if planner is not None else cost_curve if by_curve else None
            counts = _run_batch(list(batch), policy, source, history, bar, cost_curve, reprice)
            lengths = [len(entry.record.output) for entry in batch]
            reports.append(
                EpochReport(
                    epoch=epoch,
                    rollouts=len(batch),
                    tokens=sum(lengths),
                    forwards=counts.forwards,
                    steps=counts.steps,
                    drafted=counts.drafted,
                    accepted=counts.accepted,
                    makespan_s=counts.makespan(cost) if cost_curve is None else counts.seconds,
                    baseline_s=baseline_time(lengths, cost, cost_curve),
                )
            )
            for entry in batch:
                if entry.emitted is not None:
                    outputs[entry.index] = tuple(entry.emitted)
            history.set_version(epoch + 1)
    return SimulationResult(
        policy=policy.name,
        cost=cost,
        cost_curve=cost_curve,
        priced_by_curve=by_curve and policy.cost is not None,
        config=config,
        epochs=tuple(reports),
        synthetic=any(record.synthetic for record in trace),
        outputs=tuple(outputs) if record_outputs else None,
        suffix_decoding=policy.config if isinstance(policy, SuffixPolicy) else None,
    )


@dataclass(slots=True)
class _Counts:
    forwards: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    processed: int = 0  # tokens fed to forward passes, all steps and rows
    seconds: float = 0.0  # with a cost curve: the steps' times under it

    def makespan(self, cost: CostModel) -> float:
        # The sum of c_base + c_tok * tokens over steps, in the form baseline_time uses, so
        # that no speculation reproduces the baseline exactly.
        return cost.c_base * self.steps + cost.c_tok * self.processed


def _run_batch(
    live: list[_Live],
    policy: Policy,
    source: DraftSource,
    history: RolloutHistory,
    bar: tqdm,
    curve: CostCurve | None = None,
    reprice: CostCurve | LiveStepCost | None = None,
) -> _Counts:
    """Decode one batch until every rollout in `live` is done (emptying it). A rollout joins
    the history (at the history's version) as soon as it finishes, as the speculation core
    does, so that its still running siblings can draft from it. `curve` times each step;
    `reprice` reprices the policy for each step's batch size (a LiveStepCost learns each
    step's time under `curve`)."""
    counts = _Counts()
    trimming = trimmer(policy)
    while live:
        rows = len(live)
        if reprice is not None:
            policy.reprice(reprice.at(rows))
        views = [entry.view for entry in live]
        budgets = policy.budgets(views)
        # Every row drafts before any is verified: a row never sees a companion's tokens
        # of this step (the engine's order).
        drafts = source.speculate_batch([entry.index for entry in live], budgets)
        if trimming is not None:  # the policy cuts what it sized, as the speculation core does
            drafts = trimming.trim(views, drafts)
        step_tokens = 0
        emitted_rows = []
        drafted, accepted, matched_rows = [], [], []
        for entry, draft in zip(live, drafts, strict=True):
            output = entry.record.output
            position = entry.view.generated
            target = output[position : position + len(draft) + 1]
            matched = accepted_tokens(draft, target)
            # The verify pass also yields the target's own next token, if the rollout has one.
            emitted = matched if len(matched) == len(target) else [*matched, target[len(matched)]]
            emitted_rows.append(emitted)
            step_tokens += 1 + len(draft)
            entry.forwards += 1
            counts.drafted += len(draft)
            counts.accepted += len(matched)
            if len(draft):
                policy.observe_step(entry.record.group, len(draft), len(matched))
            drafted.append(len(draft))
            accepted.append(len(matched))
            matched_rows.append(matched)
            if entry.emitted is not None:
                entry.emitted.extend(emitted)
            entry.view = entry.view.advanced(len(emitted))
        if trimming is not None:  # the step's views, not yet advanced
            trimming.observe_drafts(views, drafted, accepted, matched_rows)
        # Every row's trees grow in one call, then the finished rows leave (the engine's order).
        source.extend_batch([entry.index for entry in live], emitted_rows)
        still_live = []
        for entry in live:
            output = entry.record.output
            if entry.view.generated < len(output):
                still_live.append(entry)
                continue
            source.stop_request(entry.index)
            record = entry.record
            history.add_rollout(record.group, output, history.version, record.prompt)
            policy.observe_finished(record.group, len(output))
            counts.forwards += entry.forwards
            bar.update(1)
        counts.processed += step_tokens
        counts.steps += 1
        if curve is not None:
            seconds = curve.step_seconds(rows, step_tokens)
            counts.seconds += seconds
            if isinstance(reprice, LiveStepCost):
                reprice.observe(rows, step_tokens, seconds)
        live[:] = still_live
    return counts
