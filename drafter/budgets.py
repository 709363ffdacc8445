"""Budget rules: how many draft tokens each live request gets at the next verify step.

DAS's length-aware policy (Shao et al., "Beat the long tail", arXiv 2511.13841, Eq. 7 and the
Long/Medium/Short deployment). The paper's own text could not be read from here; the equations
below follow DESIGN.md (which quotes the paper's models and closed form) and are re-derived so
that every step can be checked (tests/drafter/test_policy.py does, against brute force).

Three rules turn the same inputs (predicted remaining lengths, length classes, the cost model
and the live batch) into budgets:
- "das-rate" (marginal_budgets): per step, the batch drafts the tokens that pay for themselves.
  A request's n-th draft token is accepted with probability rate ** n, where rate is its group's
  measured per-token acceptance, and is worth a whole step if the request is the one the batch
  waits for (its chance: its share of the predicted remaining tokens); what the tokens cost is
  the cost model's c_tok each, or where one request's steps were timed token by token
  (CostModel.steps), what they add to the step (paying_count). Replaying real SmolLM2 traces
  (das simulate) it beat the closed form below by 3-6% of makespan on this CPU's cost model and
  19% on the 7B-on-H100 one.
- "das" (the default, MatchRule at the end): the same test with each draft token's own
  calibrated chance of acceptance instead of rate ** n, applied to the drafts after they are
  drafted (trim), each as deep as the best chance the calibrator gives at each depth could pay.
- "das-eq7": the closed form of DESIGN.md, described next. Its acceptance model saturates at
  k * l, which for suffix drafts (accepted per verify step, not per token drafted over a
  request's life) made it draft too little.

Cost model. One forward pass over n tokens (all rows of the batch together) takes
    t_fwd = c_base + c_tok * n.
Acceptance model. A request with l tokens still to generate that drafts p tokens in total over
its remaining forward passes gets
    A(p) = k * l * (1 - exp(-alpha * p / l))
of them accepted. k in (0, 1] is the largest share of its tokens drafts can supply; alpha is how
quickly more drafting pays off; k * alpha, the yield of sparse drafts, is at most 1 token per
draft token.
Makespan. Request i then needs N_i = l_i - A_i(p_i) forward passes and feeds N_i + p_i tokens to
them; the batch runs until its slowest request is done, so with N_fwd = max_i N_i
    T = c_base * N_fwd + c_tok * sum_i (N_i + p_i).
N_fwd is the number of forward passes the batch still needs: its makespan in decode steps. For a
given N_fwd the cheapest budgets are the smallest that let each request finish within N_fwd
passes (a draft token costs c_tok and, as k * alpha <= 1, saves at most that much), so
    p_i*(N_fwd) = -(l_i / alpha_i) * ln(1 - (1 - N_fwd / l_i) / k_i)   if l_i > N_fwd, else 0.
(DESIGN.md prints the log's argument as 1 - k_i * (1 - N_fwd / l_i); with the acceptance model as
stated, A_i(p) = l_i - N_fwd solves to the division by k_i used here. The two agree when k is
read as 1 / k; ours keeps A(p) <= k * l, so a budget is finite only where a finish within N_fwd
passes is reachable at all, N_fwd > l_i * (1 - k_i).)
What remains is the one batch-wide variable N_fwd. T(N_fwd) is convex; its minimum solves
    sum over i with l_i > N of (1 / (alpha_i * (k_i - 1 + N / l_i)) - 1) = c_base / c_tok,
found by bisection. Every live request adds a term, so a large batch pushes N_fwd up and the
budgets down (verification is compute bound: every row pays c_tok per token); as the batch drains
N_fwd falls toward the longest request's floor and its budget grows. A request predicted to end
within N_fwd passes drafts nothing.
Per step. Request i drafts p_i* / N_fwd tokens, its remaining budget spread evenly over the passes
left, rounded and capped at max_budget; the policy re-solves at every step with the live batch.

Deployment, as in the paper: each request starts in the class (Short/Medium/Long) most of its
group's recent rollouts fell in, classes cut at quantiles of all recent lengths, and moves up as
its real length grows past a class bound or past its group's predicted length. Short requests get
no drafts (and still count in the batch); the others get the closed-form budget for their
predicted remaining length (a high quantile of the group's lengths that exceed what the request
has already generated). k and alpha are fitted per group, online, from what each verify step
drafted and accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Protocol

import numpy as np
import numpy.typing as npt

from drafter import _core
from drafter.acceptance import (
    CELL_BINNING,
    Acceptance,
    AcceptanceEstimator,
    ContinuationRate,
    DraftCalibrator,
    check_step,
    fit_acceptance,
    source_bins,
)
from drafter.cost import CostModel
from drafter.draft import NO_DRAFT, Draft
from drafter.lengths import LengthClass

FloatArray = npt.NDArray[np.float64]

# -- the closed form (das-eq7) -------------------------------------------------------------


def forwards_needed(length: float, drafted: float, acceptance: Acceptance) -> float:
    """N_i = l_i - A_i(p_i): forward passes a request of `length` remaining tokens needs."""
    return length - acceptance.accepted(drafted, length)


def modeled_time(
    lengths: Sequence[float],
    drafted: Sequence[float],
    acceptance: Sequence[Acceptance],
    cost: CostModel,
) -> float:
    """T = c_base * max_i N_i + c_tok * sum_i (N_i + p_i): the batch's modeled makespan."""
    _check_batch(lengths, acceptance)
    if len(drafted) != len(lengths):
        raise ValueError("need one total draft budget per request")
    if not lengths:
        return 0.0
    forwards = [
        forwards_needed(length, p, acc)
        for length, p, acc in zip(lengths, drafted, acceptance, strict=True)
    ]
    tokens = sum(forwards) + sum(drafted)
    return cost.c_base * max(forwards) + cost.c_tok * tokens


def budget_for_forwards(length: float, forwards: float, acceptance: Acceptance) -> float:
    """p_i*(N_fwd): the fewest draft tokens, in total, that let a request of `length`
    remaining tokens finish within `forwards` passes (Eq. 7); 0 if it does without, inf if no
    budget can (forwards <= length * (1 - k))."""
    if length <= 0:
        raise ValueError(f"length must be > 0, got {length}")
    if forwards >= length:
        return 0.0
    inner = 1.0 - (1.0 - forwards / length) / acceptance.k
    if inner <= 0.0:
        return math.inf
    return -(length / acceptance.alpha) * math.log(inner)


def optimal_forwards(
    lengths: Sequence[float],
    acceptance: Sequence[Acceptance],
    cost: CostModel,
    floor: float = 0.0,
) -> float:
    """N_fwd*: the forward passes that minimise the batch's modeled time when each request
    drafts p_i*(N_fwd). `floor` is a lower bound set by requests that may not draft."""
    _check_batch(lengths, acceptance)
    if not lengths:
        return floor
    lo = max(
        floor, max(length * (1.0 - acc.k) for length, acc in zip(lengths, acceptance, strict=True))
    )
    hi = max(lengths)
    if lo >= hi:
        return lo
    target = cost.c_base / cost.c_tok
    length_array = np.asarray(lengths, dtype=np.float64)
    slack = np.asarray([acc.k for acc in acceptance]) - 1.0  # k_i - 1
    alpha = np.asarray([acc.alpha for acc in acceptance])

    def excess(forwards: float) -> float:
        # -dT/dN / c_tok - c_base / c_tok: positive while more forward passes would be cheaper.
        live = length_array > forwards
        margin = slack[live] + forwards / length_array[live]
        return float(np.sum(1.0 / (alpha[live] * margin) - 1.0)) - target

    if excess(lo + 1e-9 * hi) <= 0.0:
        return lo
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return hi


def step_budgets(
    lengths: Sequence[float],
    acceptance: Sequence[Acceptance],
    drafting: Sequence[bool],
    cost: CostModel,
    max_budget: int,
) -> list[int]:
    """Draft tokens per request for the next verify step: p_i*(N_fwd*) / N_fwd*, rounded and
    capped at max_budget; 0 for requests that may not draft (their remaining length still
    bounds N_fwd from below) and for those predicted to end within N_fwd passes."""
    _check_batch(lengths, acceptance)
    if len(drafting) != len(lengths):
        raise ValueError("need one drafting flag per request")
    if max_budget < 0:
        raise ValueError(f"max_budget must be >= 0, got {max_budget}")
    if any(length <= 0 for length in lengths):
        raise ValueError("remaining lengths must be > 0")
    budgets = [0] * len(lengths)
    chosen = [i for i, flag in enumerate(drafting) if flag]
    if not chosen or max_budget == 0:
        return budgets
    floor = max((lengths[i] for i, flag in enumerate(drafting) if not flag), default=0.0)
    forwards = optimal_forwards(
        [lengths[i] for i in chosen], [acceptance[i] for i in chosen], cost, floor
    )
    for i in chosen:
        total = budget_for_forwards(lengths[i], forwards, acceptance[i])
        per_step = total / forwards if forwards > 0 else math.inf
        budgets[i] = max_budget if per_step >= max_budget else math.floor(per_step + 0.5)
    return budgets


def _check_batch(lengths: Sequence[float], acceptance: Sequence[Acceptance]) -> None:
    if len(lengths) != len(acceptance):
        raise ValueError(
            f"need one acceptance model per request, got {len(acceptance)} for {len(lengths)}"
        )


# -- the per-step rule (das-rate) ----------------------------------------------------------


def paying_count(values: Sequence[float] | FloatArray, live_tokens: int, cost: CostModel) -> int:
    """How many of the draft tokens with these values (the seconds of the batch's time each is
    expected to save, best first) to verify in a forward of `live_tokens` tokens: the count
    whose values most exceed what they add to it, cost.draft_cost(live_tokens, count) (the
    largest such count, within 1e-9 c_tok). With a linear cost that is every token worth at
    least c_tok; where a measured step jumps (a CPU's matmul changing kernels), the tokens past
    the jump must pay for it together. Past the measured steps no token worth less than c_tok
    is taken, nor any after it."""
    value = np.ascontiguousarray(values, dtype=np.float64)
    costs = cost.draft_costs(live_tokens, np.arange(1, value.size + 1))
    return int(_core.paying_count(value, costs, len(cost.steps) - live_tokens, cost.c_tok))


def marginal_budgets(
    remaining: Sequence[float], rates: Sequence[float], cost: CostModel, max_budget: int
) -> list[int]:
    """Draft tokens per request for the next verify step, together the most that pay for
    themselves.

    The batch runs until its last request is done, so a request's accepted token saves a whole
    step only if that request is the last one; its chance of being last is taken as its share
    of the batch's predicted remaining tokens, w_i = l_i / sum_j l_j. The n-th draft token of
    request i is accepted with probability rate_i ** n (each one given the one before), so it
    is worth v = rate_i ** n * w_i * t_step, t_step = c_base + c_tok * (live requests). The
    tokens of every request are taken best first for as long as they pay for what they add to
    the step (paying_count): with a linear cost, each while v >= c_tok, that is
    n_i = floor(ln(c_tok / (w_i * t_step)) / ln(rate_i)), capped at max_budget. A full batch
    spreads w thin and makes every step dear, so drafts shrink; as it drains to its last few
    requests, w_i goes to 1 and their drafts grow. Short requests are not excluded, unlike in
    the closed form: a small w already keeps their drafts short, and where drafts are nearly
    always accepted (greedy decoding of a prompt seen before) a long request can finish sooner
    than an undrafted short one, which would then decide the makespan. Vectorised: the whole
    batch's candidate tokens in one array (hundreds of rows a step)."""
    if len(remaining) != len(rates):
        raise ValueError("need one remaining length and rate per request")
    if max_budget < 0:
        raise ValueError(f"max_budget must be >= 0, got {max_budget}")
    length = np.asarray(remaining, dtype=np.float64)
    rate = np.asarray(rates, dtype=np.float64)
    if length.size and length.min() <= 0:
        raise ValueError("remaining lengths must be > 0")
    if rate.size and not (rate.min() >= 0.0 and rate.max() <= 1.0):
        raise ValueError("rates must be in [0, 1]")
    if not length.size or max_budget == 0:
        return [0] * length.size
    worth = length / length.sum() * cost.step_time(length.size)
    # value[i, n - 1]: request i's n-th draft token; each row falls with n (rate <= 1).
    value = worth[:, None] * rate[:, None] ** np.arange(1, max_budget + 1)
    # Every token worth anything is a candidate (where a measured step is flat, even a tiny
    # value pays), in row-major order: a request's tokens in order.
    worth_anything = value > 0.0
    row, _ = np.nonzero(worth_anything)
    candidates = value[worth_anything]
    order = np.argsort(-candidates, kind="stable")
    paying = paying_count(candidates[order], length.size, cost)
    budgets: list[int] = np.bincount(row[order[:paying]], minlength=length.size).tolist()
    return budgets


# -- rules: a budget function with the acceptance evidence it prices drafts with ----------


class BudgetRule(Protocol):
    """How DasPolicy turns its length predictions into budgets: it keeps its own acceptance
    evidence (observe_step) and prices one step's drafts with it (budgets). A new rule is a
    new class of these two methods, registered in drafter.das.RULES. budgets() gets each
    request's length class only if the rule says it uses them (else an empty list)."""

    uses_length_classes: bool

    def observe_step(self, group: str, drafted: int, accepted: int) -> None: ...
    def budgets(
        self,
        groups: Sequence[str],
        remaining: Sequence[float],
        classes: Sequence[LengthClass],
        cost: CostModel,
        max_budget: int,
    ) -> list[int]: ...


class MarginalRule:
    """das-rate: marginal_budgets over each group's continuation rate (prior: all groups' rate).
    Its clock is the verify step: one per budgets() call, by which the evidence decays."""

    uses_length_classes = False

    def __init__(self, decay: float, prior_rate: float, prior_weight: float) -> None:
        self._decay = decay
        self._prior_rate = prior_rate
        self._prior_weight = prior_weight
        self._rates: dict[str, ContinuationRate] = {}
        self._pooled = ContinuationRate(decay)
        self._step = 0

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        check_step(drafted, accepted)
        if drafted == 0:
            return
        rate = self._rates.get(group)
        if rate is None:
            rate = self._rates[group] = ContinuationRate(self._decay)
        rate.observe(drafted, accepted, self._step)
        self._pooled.observe(drafted, accepted, self._step)

    def rate(self, group: str) -> float:
        """The group's per-token acceptance; its prior is the rate of all groups."""
        pooled = self._pooled.rate(self._prior_rate, self._prior_weight, self._step)
        rate = self._rates.get(group)
        return pooled if rate is None else rate.rate(pooled, self._prior_weight, self._step)

    def budgets(
        self,
        groups: Sequence[str],
        remaining: Sequence[float],
        classes: Sequence[LengthClass],
        cost: CostModel,
        max_budget: int,
    ) -> list[int]:
        self._step += 1
        by_group = {group: self.rate(group) for group in set(groups)}  # its rows share it
        return marginal_budgets(remaining, [by_group[g] for g in groups], cost, max_budget)


@dataclass(slots=True)
class _Fitted:
    """An estimator and its last fit (refit every refit_every observations)."""

    estimator: AcceptanceEstimator
    model: Acceptance | None = None
    fitted_at: int = 0  # estimator.observations at the last fit


class ClosedFormRule:
    """das-eq7: step_budgets over each group's fitted acceptance model (prior: the model
    fitted to all groups); Short requests draft nothing, as in the paper."""

    uses_length_classes = True

    def __init__(
        self, decay: float, prior: Acceptance, prior_weight: float, refit_every: int
    ) -> None:
        self._decay = decay
        self._prior = prior
        self._prior_weight = prior_weight
        self._refit_every = refit_every
        self._groups: dict[str, _Fitted] = {}
        self._pooled = _Fitted(AcceptanceEstimator(decay))

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        check_step(drafted, accepted)
        if drafted == 0:
            return
        fitted = self._groups.get(group)
        if fitted is None:
            fitted = self._groups[group] = _Fitted(AcceptanceEstimator(self._decay))
        fitted.estimator.observe(drafted, accepted)
        self._pooled.estimator.observe(drafted, accepted)

    def acceptance(self, group: str) -> Acceptance:
        """The group's fitted acceptance model; its prior is the model fitted to all groups."""
        prior = self._fit(self._pooled, self._prior)
        fitted = self._groups.get(group)
        return prior if fitted is None else self._fit(fitted, prior)

    def budgets(
        self,
        groups: Sequence[str],
        remaining: Sequence[float],
        classes: Sequence[LengthClass],
        cost: CostModel,
        max_budget: int,
    ) -> list[int]:
        drafting = [cls != LengthClass.SHORT for cls in classes]
        models = [self.acceptance(group) for group in groups]
        return step_budgets(remaining, models, drafting, cost, max_budget)

    def _fit(self, fitted: _Fitted, prior: Acceptance) -> Acceptance:
        seen = fitted.estimator.observations
        if fitted.model is None or seen - fitted.fitted_at >= self._refit_every:
            density, share, weight = fitted.estimator.points()
            fitted.model = fit_acceptance(density, share, weight, prior, self._prior_weight)
            fitted.fitted_at = seen
        return fitted.model


# -- the per-token rule (das) --------------------------------------------------------------


def token_floors(remaining: Sequence[float], cost: CostModel) -> list[float]:
    """The least acceptance chance a draft token of each request must have to pay for itself:
    c_tok / (w_i * t_step), with w_i = l_i / sum_j l_j its chance of being the request the batch
    waits for and t_step = c_base + c_tok * (live requests), as in marginal_budgets. (For a
    token whose acceptance also saves computing it later, MatchRule's refund, the floor f
    becomes c_tok / (w_i * t_step + c_tok) = f / (1 + f).)"""
    if any(length <= 0 for length in remaining):
        raise ValueError("remaining lengths must be > 0")
    total = sum(remaining)
    step = cost.step_time(len(remaining))
    return [cost.c_tok * total / (length * step) for length in remaining]


def trim_draft(draft: Draft, keep: Sequence[bool]) -> Draft:
    """The draft without the tokens not kept and their descendants (a node stays only if its
    parent does): a prefix of a chain, a subtree of a tree, parents re-indexed."""
    if len(keep) != len(draft):
        raise ValueError("need one keep flag per draft token")
    index: list[int] = []  # new index of each old token, -1: dropped
    token_ids: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    for i, parent in enumerate(draft.parents):
        if keep[i] and (parent < 0 or index[parent] >= 0):
            index.append(len(token_ids))
            token_ids.append(draft.token_ids[i])
            parents.append(-1 if parent < 0 else index[parent])
            probs.append(draft.probs[i])
        else:
            index.append(-1)
    if len(token_ids) == len(draft):
        return draft
    return replace(draft, token_ids=token_ids, parents=parents, probs=probs, score=sum(probs))


class MatchRule:
    """das: every request drafts as deep as a token could pay (budgets: at most max_budget;
    with a linear cost, the depths where the calibrator's best chance there reaches the
    request's floor c_tok / (w_i * t_step), and one more where a probe can follow; 0 where not
    even a certain token would pay), then
    trim() keeps of all drafts together the tokens that pay for what they add to the step
    (paying_count), each worth p_hat * w_i * t_step: the marginal rule's value with p_hat, the
    token's calibrated chance of acceptance (DraftCalibrator, its ancestors' included),
    instead of one rate per group. With a linear cost that cuts each draft at the last token
    with p_hat * w_i * t_step >= c_tok. Its clock is the verify step: the calibrator's
    evidence decays once per budgets() call. observe_drafts() feeds the calibrator what
    verification accepted of each draft.

    Probes (probe_chance; None: none): the first token of a path whose chance falls below
    probe_chance (in a tree, only a parent's first child: siblings cannot all be accepted) is
    valued at its hope instead where that is more: the lesser of its parent's chance and its
    cell's optimistic estimate on its own evidence (one standard deviation above the mean of
    Beta(1 + accepted, 1 + rejected) over its decayed counts alone: about 0.79 for a cell never
    tried), so a draft likely right so far is verified one token further while that token could
    still pay, and the calibrator learns from it. A deeper position's estimate starts from the
    one before it, discounted; where a request's floor is above that (a CPU's small batches:
    0.6-0.8), the deeper cells were never tried, so never learned, and drafts the target took
    whole were cut to a token or two (the greedy trace's first epoch).

    Refunds (refund_chance; None: none): an accepted draft token is one its request would
    otherwise compute as its own token in a later step, so under a linear cost it costs only
    when rejected, (1 - p) * c_tok, not c_tok. A token whose chance is at least refund_chance
    is worth p * c_tok more (its value p * (w_i * t_step + c_tok)). Below it the refund is not
    counted: there the calibrator's chances ran above what was accepted (replaying the T = 1.0
    trace, tokens given 0.4-0.6 were accepted 41-45% of the time), and with w_i spread over
    rollouts that were never the one the batch waited for, refunding them drafted 4x the
    tokens at a 2% loss; on the greedy trace, where drafts are near-certain, the refund let
    every rollout draft them whole, as the oracle does."""

    uses_length_classes = False

    def __init__(
        self,
        calibrator: DraftCalibrator,
        probe_chance: float | None = None,
        refund_chance: float | None = None,
    ) -> None:
        for name, chance in (("probe_chance", probe_chance), ("refund_chance", refund_chance)):
            if chance is not None and not 0.0 < chance <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] or None, got {chance}")
        self.calibrator = calibrator
        self.probe_chance = probe_chance
        self.refund_chance = refund_chance
        # The last trim()'s drafts, and the rows (in it) of those it kept a part of by id()
        # of their request's view (the views are kept with them, so each id stays its own),
        # until observed or the next trim().
        self._trimmed: _Trimmed | None = None
        self._pending: dict[int, int] = {}

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        check_step(drafted, accepted)  # the evidence comes per token, through observe_drafts

    def budgets(
        self,
        groups: Sequence[str],
        remaining: Sequence[float],
        classes: Sequence[LengthClass],
        cost: CostModel,
        max_budget: int,
    ) -> list[int]:
        self.calibrator.tick()  # a verify step: older evidence weighs less
        floors = np.asarray(token_floors(remaining, cost))
        if self.refund_chance is not None:  # a token at least refund_chance likely may pay less
            refunded = floors / (1.0 + floors)  # c_tok / (w * t_step + c_tok)
            floors = np.minimum(floors, np.maximum(refunded, self.refund_chance))
        if len(cost.steps) > len(remaining):
            # The measured steps reach past the batch's own tokens, where a draft token may
            # cost less than c_tok: only a token no chance pays for is ruled out.
            everything: list[int] = np.where(floors <= 1.0, max_budget, 0).tolist()
            return everything
        # Every token costs c_tok, so trim() keeps only tokens whose chance reaches the
        # request's floor: no deeper draft than the calibrator's best chance there allows
        # (a little generous against rounding: trim() cuts what does not pay), but for a
        # probe's token.
        ceilings = self.calibrator.depth_ceilings(max_budget)
        reach = np.searchsorted(-ceilings, -floors * (1.0 - 1e-6), side="right")
        if self.probe_chance is not None:
            # One token more for trim() to probe, where its parent could be likely enough.
            probing = (reach > 0) & (ceilings[np.maximum(reach - 1, 0)] >= self.probe_chance)
            reach = np.minimum(reach + probing, max_budget)
        budgets: list[int] = reach.tolist()
        return budgets

    def trim(
        self,
        requests: Sequence[object],
        drafts: Sequence[Draft],
        remaining: Sequence[float],
        cost: CostModel,
    ) -> list[Draft]:
        """The step's drafts cut to the tokens that pay, in one native call over all their
        tokens (drafter/_native/pricing.cc; before it, about 80 numpy calls a step, each slow
        right after a CPU forward): each token's calibrated chance of acceptance (its
        ancestors' included), its value, then paying_count over the whole step's tokens, best
        first (a stable order: a token never before its parent, so a chain keeps a prefix and
        a tree every kept node's parent). A draft cut to nothing is the empty Draft(). Each
        kept draft's cells wait for observe_drafts."""
        if not len(requests) == len(drafts) == len(remaining):
            raise ValueError("need one request, draft and remaining length per row")
        self._pending = {}
        sizes = np.fromiter(map(len, drafts), dtype=np.int64, count=len(drafts))
        count = int(sizes.sum())
        if not count:
            return list(drafts)
        # Only the rows that drafted: their indices in the step, drafts and sizes.
        drafted_rows = np.flatnonzero(sizes)
        at_rows = drafted_rows.tolist()
        drafting = [drafts[row] for row in at_rows]
        sizes = sizes[drafted_rows]
        live = len(remaining)
        cells, kept_tokens, kept, tree_rows = _core.cut_drafts(
            sizes,
            np.asarray(remaining, dtype=np.float64)[drafted_rows],
            np.fromiter((draft.match_len for draft in drafting), np.int64, len(drafting)),
            source_bins([draft.source for draft in drafting]),
            np.fromiter(chain.from_iterable(d.parents for d in drafting), np.int64, count),
            np.fromiter(chain.from_iterable(d.probs for d in drafting), np.float64, count),
            CELL_BINNING,
            self.calibrator.table(),
            *self.calibrator.evidence(),
            total_remaining=sum(remaining),
            step_time=cost.step_time(live),
            c_tok=cost.c_tok,
            refund_chance=self.refund_chance or 0.0,
            probe_chance=self.probe_chance or 0.0,
            draft_costs=cost.draft_costs(live, np.arange(1, count + 1)),
            past_steps=len(cost.steps) - live,
        )
        first = (np.cumsum(sizes) - sizes).tolist()
        is_tree = set(np.flatnonzero(tree_rows).tolist())
        out = list(drafts)
        for row in np.flatnonzero(kept != sizes).tolist():  # the drafts cut
            draft = drafting[row]
            if not kept[row]:
                out[at_rows[row]] = NO_DRAFT
            elif row in is_tree:
                at = first[row]
                out[at_rows[row]] = trim_draft(draft, kept_tokens[at : at + len(draft)].tolist())
            else:
                out[at_rows[row]] = _chain_prefix(draft, int(kept[row]))
        # Each kept draft's cells wait in the step's arrays: a kept node keeps its depth (its
        # ancestors are kept too).
        self._trimmed = _Trimmed(
            requests,
            out,
            at_rows,
            first,
            sizes.tolist(),
            kept.tolist(),
            cells.tolist(),
            kept_tokens,
            is_tree,
        )
        self._pending = {id(requests[at_rows[row]]): row for row in np.flatnonzero(kept).tolist()}
        return out

    def pending(self, request: object) -> tuple[list[int], Draft | None] | None:
        """The cells of what the last trim() kept of this request's draft (the same view
        object), and the kept draft if it is a tree; None if nothing of it waits."""
        row = self._pending.get(id(request))
        trimmed = self._trimmed
        if row is None or trimmed is None or trimmed.requests[trimmed.at_rows[row]] is not request:
            return None
        tree = trimmed.drafts[trimmed.at_rows[row]] if row in trimmed.trees else None
        return trimmed.kept_cells(row), tree

    def observe_drafts(
        self,
        requests: Sequence[object],
        drafted: Sequence[int],
        accepted: Sequence[int],
        tokens: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """The drafts trim() returned for these requests were verified (each its first
        drafted[i] tokens) and accepted[i] of them kept. A chain's first accepted[i] tokens
        were accepted, the rest not, all rows' in one pass over the calibrator; a tree's
        accepted path is found by following tokens[i] (the tokens the request appended, the
        accepted ones first) from its root, and without them a tree teaches nothing."""
        if not len(requests) == len(drafted) == len(accepted):
            raise ValueError("need drafted and accepted per request")
        if tokens is not None and len(tokens) != len(requests):
            raise ValueError("need the appended tokens of every request")
        for n_drafted, n_accepted in zip(drafted, accepted, strict=True):
            check_step(n_drafted, n_accepted)
        trimmed, pending = self._trimmed, self._pending
        if trimmed is None or not pending:
            return
        starts: list[int] = []
        lengths: list[int] = []
        hits: list[int] = []
        for i, request in enumerate(requests):
            row = pending.pop(id(request), None) if drafted[i] else None
            if row is None or trimmed.requests[trimmed.at_rows[row]] is not request:
                continue
            if row in trimmed.trees:
                self._observe_tree(
                    trimmed, row, drafted[i], accepted[i], None if tokens is None else tokens[i]
                )
                continue
            verified = min(drafted[i], trimmed.kept[row])  # a chain keeps a prefix
            starts.append(trimmed.first[row])
            lengths.append(verified)
            hits.append(min(accepted[i], verified))
        if starts:
            self.calibrator.observe_runs(trimmed.cells, starts, lengths, hits)

    def _observe_tree(
        self, trimmed: _Trimmed, row: int, drafted: int, accepted: int, tokens: Sequence[int] | None
    ) -> None:
        tree = trimmed.drafts[trimmed.at_rows[row]]
        if tokens is None or drafted < len(tree):
            return
        on_path = [False] * len(tree)
        node = -1
        for token in list(tokens)[:accepted]:
            node = next(
                (
                    i
                    for i, parent in enumerate(tree.parents)
                    if parent == node and tree.token_ids[i] == token
                ),
                -2,
            )
            if node < 0:
                break
            on_path[node] = True
        self.calibrator.observe_outcomes(trimmed.kept_cells(row), on_path)


@dataclass(frozen=True, slots=True)
class _Trimmed:
    """One trim()'s result and, for each row that drafted (a row of the step's token
    arrays), where its tokens are in them."""

    requests: Sequence[object]  # the step's requests
    drafts: list[Draft]  # what trim() returned for them
    at_rows: list[int]  # each drafting row's index in the step
    first: list[int]  # its first token's index in cells
    sizes: list[int]  # its draft's tokens
    kept: list[int]  # how many of them trim() kept
    cells: list[int]  # every drafted token's calibrator cell
    kept_tokens: npt.NDArray[np.uint8]  # whether trim() kept it (1) or not (0)
    trees: set[int]  # the drafting rows whose drafts are trees

    def kept_cells(self, row: int) -> list[int]:
        """The cells of what trim() kept of a drafting row's draft (a tree: its kept nodes)."""
        at = self.first[row]
        if row not in self.trees:  # a chain keeps a prefix
            return self.cells[at : at + self.kept[row]]
        kept = np.flatnonzero(self.kept_tokens[at : at + self.sizes[row]]).tolist()
        return [self.cells[at + i] for i in kept]


def _chain_prefix(draft: Draft, count: int) -> Draft:
    """A chain's first `count` tokens (trim_draft keeping those)."""
    probs = draft.probs[:count]
    return Draft(
        draft.token_ids[:count],
        draft.parents[:count],
        probs,
        sum(probs),
        draft.match_len,
        draft.source,
    )
