"""EngineDrafter: our speculation core as vLLM's engine core drives it (no vLLM imports here).

It lives in the engine-core process, on the thread that runs vLLM's steps, and only that
thread calls it (the proposer each step, the runner's removal hook, and the worker's RPCs,
which vLLM runs between steps). Per step it gets the rows of the input batch: a row seen for
the first time starts a Speculator request (its group and sample index come from
sampling_params.extra_args, set by our worker), the tokens a row gained are its last
draft's outcome (extend), and then one Speculator.drafts call prices the whole live batch.

Finishing. vLLM's runner removes a request without saying why, and stop strings are
matched in the front-end process, which then aborts the request in the engine core: only
the worker knows whether a request ended by itself. So a removed request waits in
`departed` until the worker settles it (settle(): natural or not, and its final token count,
less what vLLM generated past a stop); a natural one then joins the history and comes back
to the worker for Redis, an aborted one does neither.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from drafter.config import DrafterConfig
from drafter.cost import CostModel, parse_cost_model
from drafter.groups import group_of
from drafter.history import RolloutHistory
from drafter.policy import Policy
from drafter.policy_spec import parse_policy, parse_policy_spec
from drafter.speculator import Rollout, SpecRequest, Speculator
from service.vllm_backend.config import DasVllmOptions

log = logging.getLogger(__name__)

# The keys our worker sets in sampling_params.extra_args (vllm_xargs on the OpenAI API).
GROUP_ARG = "das_group"
SAMPLE_ARG = "das_sample"
ID_ARG = "das_id"

_MAX_DEPARTED = 4096  # removed requests nobody settled (a worker that went away) are dropped


@dataclass(frozen=True, slots=True)
class Row:
    """One row of vLLM's input batch after a step, as the proposer reads it."""

    req_id: str  # vLLM's (internal) request id
    sampled: list[int]  # tokens the row gained this step; [] while its prompt is prefilled
    prompt: Callable[[], Sequence[int]]  # its prompt token ids (read once, at start)
    extra_args: dict[str, Any] | None
    cap: int  # most draft tokens it may take (model length and max_tokens left)


@dataclass(slots=True, eq=False)
class _Tracked:
    spec: SpecRequest
    das_id: str
    drafted: int = 0  # tokens of the draft it was last given


@dataclass(slots=True)
class Calibrator:
    """Fits c_base + c_tok * n to vLLM's own step times (n: tokens scheduled in the step).

    The first fit comes from the worker's start-up requests (prompts of 8 to 128 tokens);
    after it the calibrator keeps timing decode steps and refits every `refit_every` of them
    on the last `window`, so the model prices what drafting really costs in the verify steps
    of this engine under this load (a prefill step is cheaper per token than a verify step)."""

    steps: int
    skip: int = 4  # the first steps warm vLLM up (allocations, kernel selection)
    window: int = 256
    refit_every: int = 32
    points: list[tuple[int, float]] = field(default_factory=list)
    seen: int = 0
    fitted: bool = False
    since_fit: int = 0

    def add(self, tokens: int, seconds: float) -> CostModel | None:
        """One timed step; a new fit when one is due and the points allow one."""
        self.seen += 1
        if self.seen <= self.skip:
            return None
        self.points.append((tokens, seconds))
        del self.points[: -self.window]
        self.since_fit += 1
        if len(self.points) < self.steps or (self.fitted and self.since_fit < self.refit_every):
            return None
        cost = self._fit()
        if cost is not None:
            self.fitted, self.since_fit = True, 0
        return cost

    def _fit(self) -> CostModel | None:
        sizes = sorted({n for n, _ in self.points})
        if len(sizes) < 3 or sizes[-1] < max(16, 2 * sizes[0]):
            return None
        # Medians per size keep one stalled step (another process on the CPU) out of the fit.
        by_size: dict[int, list[float]] = {}
        for n, t in self.points:
            by_size.setdefault(n, []).append(t)
        medians = [(n, sorted(ts)[len(ts) // 2]) for n, ts in by_size.items()]
        try:
            return CostModel.fit(medians)
        except ValueError:  # c_base or c_tok came out <= 0: keep measuring
            return None


class EngineDrafter:
    def __init__(self, options: DasVllmOptions) -> None:
        self.options = options
        self.history = RolloutHistory(
            DrafterConfig(
                max_depth=options.max_depth,
                window=options.window,
                max_rollouts_per_group=options.max_rollouts_per_group,
                max_groups=options.max_groups,
                min_prob=options.min_prob,
                live_siblings=options.live_siblings,
                other_groups=options.other_groups,
                extend_threads=options.extend_threads,
            )
        )
        cost = parse_cost_model(options.cost_model)
        self.cost_source = options.cost_model
        priced = parse_policy_spec(options.policy).kind.startswith("das")  # fixed:K is not
        calibrate = cost is None and priced
        self._calibrator = Calibrator(options.calibration_steps) if calibrate else None
        self.refits = 0  # fits after the first one
        # Until calibrated, the policy is priced with a placeholder and never asked for a
        # budget: drafts stay empty, requests and rollouts are tracked all the same.
        self.speculator = Speculator(
            self.history,
            self._policy(cost or CostModel(1.0, 1.0)),
            max_draft=options.max_draft,
        )
        self._live: dict[str, _Tracked] = {}  # by vLLM request id
        self._req_ids: dict[str, str] = {}  # vLLM request id by das id, until settled
        self._gone: set[str] = set()  # settled while vLLM still held them
        self._departed: dict[str, _Tracked] = {}
        self._step_started: float | None = None
        self.steps = 0
        self.propose_seconds = 0.0  # time spent in propose(), for profiling

    def _policy(self, cost: CostModel) -> Policy:
        return parse_policy(self.options.policy, cost)

    @property
    def calibrating(self) -> bool:
        """No cost model fitted yet: nothing is drafted."""
        return self._calibrator is not None and not self._calibrator.fitted

    @property
    def cost(self) -> CostModel | None:
        """The cost model drafts are priced with (None: still calibrating, or a policy that
        prices nothing, fixed:K)."""
        return None if self.calibrating else self.speculator.policy.cost

    # -- per step ---------------------------------------------------------------------

    def step_started(self) -> None:
        """The runner began a forward pass (for the calibration's timing)."""
        self._step_started = time.perf_counter()

    def step_timed(self, tokens: int, prefill: bool = False) -> None:
        """The forward pass and sampling of `tokens` scheduled tokens are done (`prefill`:
        the step began new requests; refits time decode steps only)."""
        started, self._step_started = self._step_started, None
        calibrator = self._calibrator
        if calibrator is None or started is None or tokens <= 0:
            return
        first = not calibrator.fitted
        if prefill and not first:
            return
        cost = calibrator.add(tokens, time.perf_counter() - started)
        if cost is None:
            return
        if first:
            self.speculator.policy = self._policy(cost)
            log.info("DAS cost model from vLLM's steps: %s", cost)
        else:
            self.speculator.policy.reprice(cost)
            self.refits += 1
        self.cost_source = "calibrated on vLLM's steps"

    def propose(self, rows: Sequence[Row]) -> list[list[int]]:
        """One draft per row (maybe empty): record what each row gained, then draft."""
        began = time.perf_counter()
        self.steps += 1
        speculator = self.speculator
        drafting: list[_Tracked] = []
        caps: list[int] = []
        order: list[int] = []
        gained: list[_Tracked] = []
        sampled: list[list[int]] = []
        for i, row in enumerate(rows):
            if not row.sampled or row.req_id in self._gone:  # prefilling, or settled
                continue
            tracked = self._live.get(row.req_id)
            if tracked is None:
                tracked = self._start(row)
            gained.append(tracked)
            sampled.append(row.sampled)
            if row.cap > 0:
                drafting.append(tracked)
                caps.append(row.cap)
                order.append(i)
        drafted = [tracked.drafted for tracked in gained]
        # Every row's gain recorded in one call (the drafter's trees grow together).
        speculator.extend_batch(
            [tracked.spec for tracked in gained],
            sampled,
            drafted,
            [min(max(len(s) - 1, 0), d) for s, d in zip(sampled, drafted, strict=True)],
        )
        for tracked in gained:
            tracked.drafted = 0
        out: list[list[int]] = [[] for _ in rows]
        if drafting and not self.calibrating:
            drafts = speculator.drafts([t.spec for t in drafting], caps)
            for i, tracked, draft in zip(order, drafting, drafts, strict=True):
                tokens = list(draft.token_ids)
                tracked.drafted = len(tokens)
                out[i] = tokens
        self.propose_seconds += time.perf_counter() - began
        return out

    def _start(self, row: Row) -> _Tracked:
        args = row.extra_args or {}
        prompt = [int(t) for t in row.prompt()]
        group = group_of(_text(args.get(GROUP_ARG)), prompt)
        sample = args.get(SAMPLE_ARG, 0)
        das_id = _text(args.get(ID_ARG)) or row.req_id
        spec = self.speculator.start(das_id, group, prompt, int(sample) if sample else 0)
        tracked = _Tracked(spec, das_id)
        self._live[row.req_id] = tracked
        self._req_ids[das_id] = row.req_id
        return tracked

    def removed(self, req_id: str) -> None:
        """vLLM's runner dropped the request (finished or aborted: settle() says which)."""
        self._gone.discard(req_id)
        tracked = self._live.pop(req_id, None)
        if tracked is None:  # it ended during prefill (never started here), or was settled
            return
        self._departed[tracked.das_id] = tracked
        while len(self._departed) > _MAX_DEPARTED:
            oldest = next(iter(self._departed))
            self._req_ids.pop(oldest, None)
            self.speculator.finish(self._departed.pop(oldest).spec, natural=False)

    # -- the worker's calls (vLLM runs them between steps) ----------------------------

    def settle(self, ended: Sequence[tuple[str, bool, int]]) -> dict[str, Any]:
        """The worker's word on requests that ended: (das id, natural, final output token
        count). Settles those already removed here and answers their counters, and the
        rollouts that joined the history (for Redis); ids not removed yet stay pending."""
        counters: dict[str, tuple[int, int, int, str, dict[str, int], dict[str, int]]] = {}
        rollouts: list[tuple[str, list[int], list[int], int]] = []
        pending: list[str] = []
        for das_id, natural, length in ended:
            tracked = self._departed.pop(das_id, None)
            if tracked is None:
                req_id = self._req_ids.get(das_id)
                if req_id is None:  # not started here (ended in prefill) or not seen yet
                    pending.append(das_id)
                    continue
                # Still in vLLM's batch (its removal comes with the next step): settled now,
                # and never drafted for again.
                tracked = self._live.pop(req_id)
                self._gone.add(req_id)
            del self._req_ids[das_id]
            spec = tracked.spec
            del spec.output[length:]  # vLLM may have sampled past a stop in the last step
            rollout: Rollout | None = self.speculator.finish(spec, natural)
            c = spec.counters
            length_class = self.speculator.length_class(spec)
            counters[das_id] = (
                c.forward_passes,
                c.drafted,
                c.accepted,
                length_class,
                c.drafted_by_source,
                c.accepted_by_source,
            )
            if rollout is not None:
                rollouts.append((rollout.group, rollout.prompt, rollout.output, rollout.version))
        return {"counters": counters, "rollouts": rollouts, "pending": pending}

    def add_rollouts(self, rollouts: Sequence[tuple[str, list[int], list[int], int]]) -> int:
        """Rollouts shared by other workers (from Redis): into the local history."""
        added = 0
        for group, prompt, output, version in rollouts:
            added += self.history.add_rollout(group, output, version, prompt)
        return added

    def set_version(self, version: int) -> int:
        """A new policy version (weights reloaded): older rollouts leave the window."""
        if version > self.history.version:
            return self.history.set_version(version)
        return 0

    def stats(self) -> dict[str, Any]:
        cost = self.cost
        return {
            "live_requests": len(self._live),
            "unsettled_requests": len(self._departed),
            "history_groups": len(self.history.groups()),
            "history_tokens": self.history.num_tokens(),
            "history_version": self.history.version,
            "policy": self.speculator.policy.name,
            "cost_model": None if cost is None else cost.to_json(),
            "cost_source": "calibrating" if self.calibrating else self.cost_source,
            "cost_refits": self.refits,
            "steps": self.steps,
            "propose_seconds": self.propose_seconds,
        }

    def group_lengths(self) -> dict[str, list[int]]:
        return {group: self.history.recent_lengths(group) for group in self.history.groups()}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)
