"""Speculation budgets: how many draft tokens each live request gets at a verify step.

DAS's length-aware policy (Shao et al., "Beat the long tail", arXiv 2511.13841, Eq. 7 and the
Long/Medium/Short deployment). The paper's own text could not be read from here; the equations
below follow DESIGN.md (which quotes the paper's models and closed form) and are re-derived so
that every step can be checked (tests/drafter/test_policy.py does, against brute force).

Two rules turn the same inputs (predicted remaining lengths, length classes, the cost model and
the live batch) into budgets:
- "das" (the default, marginal_budgets): per step, each request drafts the tokens that pay for
  themselves. Its n-th draft token is accepted with probability rate ** n, where rate is its
  group's measured per-token acceptance, and is worth a whole step if the request is the one the
  batch waits for (its chance: its share of the predicted remaining tokens). Replaying real
  SmolLM2 traces (das simulate) it beat the closed form below by 3-6% of makespan on this CPU's
  cost model and 19% on the 7B-on-H100 one; in measured engine runs on a 2-core CPU the two
  were within that machine's noise of each other (README).
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

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt

# -- cost model ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CostModel:
    """Time of one forward pass: c_base + c_tok * (tokens in it, all rows together), seconds."""

    c_base: float
    c_tok: float

    def __post_init__(self) -> None:
        for name, value in (("c_base", self.c_base), ("c_tok", self.c_tok)):
            if not math.isfinite(value) or value <= 0.0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")

    def step_time(self, n_tokens: int) -> float:
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        return self.c_base + self.c_tok * n_tokens

    @classmethod
    def fit(cls, points: Sequence[tuple[int, float]]) -> CostModel:
        """Least-squares fit to (tokens in the forward pass, seconds) measurements."""
        if len({n for n, _ in points}) < 2:
            raise ValueError("fitting a cost model needs points at two or more token counts")
        tokens = np.asarray([n for n, _ in points], dtype=np.float64)
        seconds = np.asarray([t for _, t in points], dtype=np.float64)
        design = np.stack([np.ones_like(tokens), tokens], axis=1)
        (c_base, c_tok), *_ = np.linalg.lstsq(design, seconds, rcond=None)
        return cls(float(c_base), float(c_tok))


# SmolLM2-135M decode steps measured on this 2-core CPU (DESIGN.md; fp32, KV cache of 100
# tokens), as (tokens in the forward pass, seconds): batch 1 drafting 0/7/15 tokens, batch 16
# drafting 0/3/7 tokens per row.
SMOLLM2_CPU_STEPS: tuple[tuple[int, float], ...] = (
    (1, 0.058),
    (8, 0.079),
    (16, 0.092),
    (16, 0.096),
    (64, 0.209),
    (128, 0.315),
)
# CostModel.fit(SMOLLM2_CPU_STEPS), rounded: c_base 62.5 ms, c_tok 2.03 ms per token; mean
# relative error 4.4%, worst 11% (the 1-token step at batch 1, which the line overestimates).
SMOLLM2_CPU = CostModel(c_base=0.0625, c_tok=0.00203)
# A 7B model on one H100, the projection the engine issue asks for: 6.5 ms per step, 14 GFLOP
# per verified token at about 600 TFLOP/s.
H100_7B = CostModel(c_base=0.0065, c_tok=0.000023)


# -- acceptance model ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acceptance:
    """A(p) = k * l * (1 - exp(-alpha * p / l)): accepted tokens of p drafted over l tokens."""

    k: float  # (0, 1]: the largest share of a request's tokens that drafts can supply
    alpha: float  # > 0 with k * alpha <= 1: how fast more drafting pays off

    def __post_init__(self) -> None:
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {self.k}")
        if not (math.isfinite(self.alpha) and self.alpha > 0.0):
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.k * self.alpha > 1.0 + 1e-9:
            raise ValueError(f"k * alpha must be <= 1, got {self.k} * {self.alpha}")

    def accepted(self, drafted: float, length: float) -> float:
        if drafted < 0 or length <= 0:
            raise ValueError(f"need drafted >= 0 and length > 0, got {drafted}, {length}")
        return self.k * length * -math.expm1(-self.alpha * drafted / length)


# -- the closed form -----------------------------------------------------------------------


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


# -- length prediction and classes ---------------------------------------------------------


class LengthClass(IntEnum):
    SHORT = 0
    MEDIUM = 1
    LONG = 2


@dataclass(frozen=True, slots=True)
class ClassBounds:
    """Lengths up to short_max are Short, up to medium_max Medium, longer ones Long."""

    short_max: float
    medium_max: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_max <= self.medium_max:
            raise ValueError(
                f"need 0 <= short_max <= medium_max, got {self.short_max}, {self.medium_max}"
            )

    def classify(self, length: float) -> LengthClass:
        if length <= self.short_max:
            return LengthClass.SHORT
        if length <= self.medium_max:
            return LengthClass.MEDIUM
        return LengthClass.LONG


def class_bounds(
    lengths: Sequence[int], short_quantile: float, long_quantile: float
) -> ClassBounds | None:
    """Class bounds at two quantiles of the workload's recent lengths (None without any)."""
    if not 0.0 < short_quantile <= long_quantile < 1.0:
        raise ValueError(
            f"need 0 < short_quantile <= long_quantile < 1, got {short_quantile}, {long_quantile}"
        )
    if not lengths:
        return None
    ordered = sorted(lengths)
    return ClassBounds(quantile(ordered, short_quantile), quantile(ordered, long_quantile))


def initial_class(group_lengths: Sequence[int], bounds: ClassBounds | None) -> LengthClass:
    """The class most of the group's recent rollouts fell in (ties go to the longer class, the
    one that matters for the makespan); Medium when nothing is known."""
    if bounds is None or not group_lengths:
        return LengthClass.MEDIUM
    votes = [0, 0, 0]
    for length in group_lengths:
        votes[bounds.classify(length)] += 1
    return LengthClass(max(range(3), key=lambda c: (votes[c], c)))


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (numpy's default method)."""
    if not ordered:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def predict_length(
    group_lengths: Sequence[int],
    generated: int,
    length_quantile: float,
    prior_length: float,
    tail_growth: float,
) -> float:
    """Predicted total output length of a request that has generated `generated` tokens: the
    `length_quantile` of its group's recent lengths exceeding `generated` (the rollouts it can
    still resemble). Past every one of them, or with no history (then at least prior_length),
    it expects to run another tail_growth * generated tokens."""
    if generated < 0:
        raise ValueError(f"generated must be >= 0, got {generated}")
    ordered = sorted(group_lengths)
    survivors = ordered[bisect.bisect_right(ordered, generated) :]
    if survivors:
        return quantile(survivors, length_quantile)
    floor = prior_length if not group_lengths else 0.0
    return max(floor, (1.0 + tail_growth) * generated, generated + 1.0)


def current_class(
    initial: LengthClass,
    generated: int,
    group_lengths: Sequence[int],
    bounds: ClassBounds | None,
    length_quantile: float,
) -> LengthClass:
    """A request's class now: never below its initial class; at least the class of what it has
    already generated; one above its initial class once it outgrew its group's predicted
    length (the `length_quantile` of the group's recent lengths)."""
    cls = initial
    if bounds is not None:
        cls = max(cls, bounds.classify(generated))
    if group_lengths and generated > quantile(sorted(group_lengths), length_quantile):
        cls = max(cls, LengthClass(min(initial + 1, LengthClass.LONG)))
    return cls


# -- online acceptance estimation ----------------------------------------------------------

# Verify steps are pooled by how many tokens they drafted: bucket b holds draft lengths in
# [_BUCKET_STARTS[b], _BUCKET_STARTS[b + 1]).
_BUCKET_STARTS = (1, 2, 3, 5, 9, 17, 33)


def _bucket(drafted: int) -> int:
    for b in range(len(_BUCKET_STARTS) - 1, -1, -1):
        if drafted >= _BUCKET_STARTS[b]:
            return b
    raise ValueError(f"drafted must be >= 1, got {drafted}")


class AcceptanceEstimator:
    """Exponentially weighted (drafted, accepted) totals of verify steps, per draft length.

    A bucket whose steps drafted d tokens and accepted a per step on average is one point of
    the acceptance curve: draft density x = d / (a + 1) draft tokens per output token, accepted
    share f = a / (a + 1) of the output, and the model says f = k * (1 - exp(-alpha * x)).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self._decay = decay
        self._drafted = np.zeros(len(_BUCKET_STARTS))
        self._accepted = np.zeros(len(_BUCKET_STARTS))
        self._steps = np.zeros(len(_BUCKET_STARTS))
        self.observations = 0  # steps seen, undecayed

    def observe(self, drafted: int, accepted: int) -> None:
        if not 0 <= accepted <= drafted:
            raise ValueError(f"need 0 <= accepted <= drafted, got {accepted}, {drafted}")
        if drafted == 0:
            return  # nothing was tried: no evidence either way
        if self._decay < 1.0:
            self._drafted *= self._decay
            self._accepted *= self._decay
            self._steps *= self._decay
        b = _bucket(drafted)
        self._drafted[b] += drafted
        self._accepted[b] += accepted
        self._steps[b] += 1.0
        self.observations += 1

    def points(self) -> tuple[list[float], list[float], list[float]]:
        """(draft densities, accepted shares, weights in steps) of the non-empty buckets."""
        used = self._steps > 1e-12
        outputs = self._accepted[used] + self._steps[used]
        density = self._drafted[used] / outputs
        share = self._accepted[used] / outputs
        return density.tolist(), share.tolist(), self._steps[used].tolist()


_ALPHA_RANGE = (0.01, 10.0, 72)  # the coarse log grid of alpha: from, to, points
_MIN_K = 1e-3
# The prior enters the fit as pseudo-observations of its own curve at these draft densities.
_PRIOR_DENSITIES = (0.25, 0.5, 1.0, 2.0, 4.0)


def fit_acceptance(
    density: Sequence[float],
    share: Sequence[float],
    weight: Sequence[float],
    prior: Acceptance,
    prior_weight: float,
) -> Acceptance:
    """Weighted least squares of share = k * (1 - exp(-alpha * density)) over (k, alpha) with
    k * alpha <= 1. The prior counts as prior_weight steps of evidence lying on its own curve,
    so with no data the fit is the prior and with much data the prior fades. For each alpha on
    a log grid the best k has a closed form; the best alpha is then refined on a finer grid."""
    if not len(density) == len(share) == len(weight):
        raise ValueError("density, share and weight must have the same length")
    if prior_weight <= 0:
        raise ValueError(f"prior_weight must be > 0, got {prior_weight}")
    pseudo_density = np.asarray(_PRIOR_DENSITIES)
    pseudo_share = prior.k * -np.expm1(-prior.alpha * pseudo_density)
    x = np.concatenate([np.asarray(density, dtype=np.float64), pseudo_density])
    f = np.concatenate([np.asarray(share, dtype=np.float64), pseudo_share])
    pseudo_weight = np.full(len(_PRIOR_DENSITIES), prior_weight / len(_PRIOR_DENSITIES))
    w = np.concatenate([np.asarray(weight, dtype=np.float64), pseudo_weight])

    def best(alphas: npt.NDArray[np.float64]) -> tuple[float, float]:
        g = -np.expm1(-np.outer(alphas, x))  # (alphas, points)
        k = (g @ (w * f)) / (g**2 @ w)
        k = np.clip(k, _MIN_K, np.minimum(1.0, 1.0 / alphas))  # the residual is convex in k
        residual = ((f[None, :] - k[:, None] * g) ** 2) @ w
        i = int(np.argmin(residual))
        return float(k[i]), float(alphas[i])

    low, high, points = _ALPHA_RANGE
    grid = np.geomspace(low, high, points)
    _, alpha = best(grid)
    step = float(grid[1] / grid[0])
    k, alpha = best(np.geomspace(alpha / step, alpha * step, 41))
    return Acceptance(k=k, alpha=min(alpha, 1.0 / k))


# -- the per-step rule (das) ---------------------------------------------------------------


class ContinuationRate:
    """Exponentially weighted per-token acceptance of chain drafts: a verify step that drafted
    d tokens and accepted a of them tried min(a + 1, d) positions (the first rejection ends the
    chain) and a of those succeeded. rate() is the chance that a draft token is accepted given
    that the one before it was, with the prior worth prior_weight tried positions."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self._decay = decay
        self._tried = 0.0
        self._accepted = 0.0

    def observe(self, drafted: int, accepted: int) -> None:
        _check_step(drafted, accepted)
        if drafted == 0:
            return
        self._tried = self._tried * self._decay + min(accepted + 1, drafted)
        self._accepted = self._accepted * self._decay + accepted

    def rate(self, prior: float, prior_weight: float) -> float:
        return (self._accepted + prior * prior_weight) / (self._tried + prior_weight)


def marginal_budgets(
    remaining: Sequence[float], rates: Sequence[float], cost: CostModel, max_budget: int
) -> list[int]:
    """Draft tokens per request for the next verify step, each the most that pays for itself.

    The batch runs until its last request is done, so a request's accepted token saves a whole
    step only if that request is the last one; its chance of being last is taken as its share
    of the batch's predicted remaining tokens, w_i = l_i / sum_j l_j. The n-th draft token of
    request i is accepted with probability rate_i ** n (each one given the one before) and costs
    c_tok to verify, so it is worth drafting while
        rate_i ** n * w_i * t_step >= c_tok,   t_step = c_base + c_tok * (live requests),
    that is n_i = floor(ln(c_tok / (w_i * t_step)) / ln(rate_i)), capped at max_budget. A full
    batch spreads w thin and makes every step dear, so drafts shrink; as it drains to its last
    few requests, w_i goes to 1 and their drafts grow. Short requests are not excluded, unlike
    in the closed form: a small w already keeps their drafts short, and where drafts are nearly
    always accepted (greedy decoding of a prompt seen before) a long request can finish sooner
    than an undrafted short one, which would then decide the makespan."""
    if len(remaining) != len(rates):
        raise ValueError("need one remaining length and rate per request")
    if max_budget < 0:
        raise ValueError(f"max_budget must be >= 0, got {max_budget}")
    if any(length <= 0 for length in remaining):
        raise ValueError("remaining lengths must be > 0")
    if any(not 0.0 <= rate <= 1.0 for rate in rates):
        raise ValueError("rates must be in [0, 1]")
    total = sum(remaining)
    step = cost.step_time(len(remaining))
    budgets = []
    for length, rate in zip(remaining, rates, strict=True):
        floor = cost.c_tok / (length / total * step)  # least acceptance a token must have
        if rate <= 0.0 or floor > rate:
            budgets.append(0)
        elif rate >= 1.0 or floor <= 0.0:
            budgets.append(max_budget)
        else:
            # The tiny slack keeps an exact power (rate ** n == floor) from rounding below n.
            tokens = math.floor(math.log(floor) / math.log(rate) + 1e-9)
            budgets.append(min(max_budget, tokens))
    return budgets


# -- policies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy sees of a live request: its prompt group, the tokens it has generated so
    far, and the length class it started in (from policy.request)."""

    group: str
    generated: int = 0
    initial_class: LengthClass = LengthClass.MEDIUM

    def __post_init__(self) -> None:
        if self.generated < 0:
            raise ValueError(f"generated must be >= 0, got {self.generated}")

    def advanced(self, tokens: int) -> RequestView:
        return replace(self, generated=self.generated + tokens)


class Policy(Protocol):
    """A speculation policy. One object per engine (or simulation): it holds its per-group
    estimates; the engine calls request() when a request starts, budgets() once per verify
    step with every live request, observe_step() per request per step, observe_finished()."""

    @property
    def name(self) -> str: ...
    def request(self, group: str) -> RequestView: ...
    def budgets(self, requests: Sequence[RequestView]) -> list[int]: ...
    def observe_step(self, group: str, drafted: int, accepted: int) -> None: ...
    def observe_finished(self, group: str, length: int) -> None: ...


class FixedPolicy:
    """The same draft budget for every request at every step (0: no speculation)."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.budget = budget

    @property
    def name(self) -> str:
        return "none" if self.budget == 0 else f"fixed:{self.budget}"

    def request(self, group: str) -> RequestView:
        return RequestView(group)

    def budgets(self, requests: Sequence[RequestView]) -> list[int]:
        return [self.budget] * len(requests)

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        _check_step(drafted, accepted)

    def observe_finished(self, group: str, length: int) -> None:
        _check_length(length)


DAS_RULES = ("marginal", "eq7")


@dataclass(frozen=True, slots=True)
class DasConfig:
    rule: str = "marginal"  # "marginal" (marginal_budgets) or "eq7" (the closed form, step_budgets)
    max_budget: int = 16  # most draft tokens one request gets in one verify step
    length_quantile: float = 0.9  # predicted length: this quantile of the group's lengths
    short_quantile: float = 1 / 3  # Short: at most this quantile of all recent lengths
    long_quantile: float = 2 / 3  # Long: above this quantile of all recent lengths
    prior_length: int = 256  # predicted length of a group with no finished rollout yet
    tail_growth: float = 0.5  # past all its group's rollouts: expect this share more
    history: int = 64  # recent lengths kept per group
    prior_rate: float = 0.5  # per-token acceptance (marginal) before any evidence...
    prior_k: float = 0.5  # acceptance model (eq7) before any evidence...
    prior_alpha: float = 1.0
    prior_weight: float = 16.0  # ...worth this many verify steps (tried positions) of evidence
    decay: float = 0.995  # per verify step: the weight of older acceptance evidence
    refit_every: int = 8  # verify steps between refits of a group's acceptance model

    def __post_init__(self) -> None:
        if self.rule not in DAS_RULES:
            raise ValueError(f"rule must be one of {DAS_RULES}, got {self.rule!r}")
        if not 0.0 <= self.prior_rate <= 1.0:
            raise ValueError(f"prior_rate must be in [0, 1], got {self.prior_rate}")
        if not 1 <= self.max_budget <= 1024:
            raise ValueError(f"max_budget must be in [1, 1024], got {self.max_budget}")
        if not 0.0 < self.length_quantile <= 1.0:
            raise ValueError(f"length_quantile must be in (0, 1], got {self.length_quantile}")
        if not 0.0 < self.short_quantile <= self.long_quantile < 1.0:
            raise ValueError(
                "need 0 < short_quantile <= long_quantile < 1, got "
                f"{self.short_quantile}, {self.long_quantile}"
            )
        if self.prior_length < 1:
            raise ValueError(f"prior_length must be >= 1, got {self.prior_length}")
        if not (math.isfinite(self.tail_growth) and self.tail_growth >= 0.0):
            raise ValueError(f"tail_growth must be >= 0, got {self.tail_growth}")
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        Acceptance(self.prior_k, self.prior_alpha)  # raises if the prior is not a valid model
        if not (math.isfinite(self.prior_weight) and self.prior_weight > 0.0):
            raise ValueError(f"prior_weight must be > 0, got {self.prior_weight}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.refit_every < 1:
            raise ValueError(f"refit_every must be >= 1, got {self.refit_every}")


@dataclass(slots=True)
class _Fitted:
    """An estimator and its last fit (refit every refit_every observations)."""

    estimator: AcceptanceEstimator
    model: Acceptance | None = None
    fitted_at: int = 0  # estimator.observations at the last fit


@dataclass(frozen=True, slots=True)
class Prediction:
    length: float  # predicted total output length
    length_class: LengthClass


class DasPolicy:
    """The DAS length-aware budget: per group, recent lengths (the length classes and the
    predicted remaining lengths) and online acceptance estimates; per step, the budgets of
    config.rule for the live batch: marginal_budgets ("das") or the closed form ("das-eq7")."""

    def __init__(self, cost: CostModel, config: DasConfig | None = None) -> None:
        self.cost = cost
        self.config = config or DasConfig()
        self._lengths: dict[str, deque[int]] = {}
        self._bounds: ClassBounds | None = None
        self._bounds_stale = False
        self._groups: dict[str, _Fitted] = {}
        self._pooled = _Fitted(AcceptanceEstimator(self.config.decay))
        self._rates: dict[str, ContinuationRate] = {}
        self._pooled_rate = ContinuationRate(self.config.decay)

    @property
    def name(self) -> str:
        return "das" if self.config.rule == "marginal" else f"das-{self.config.rule}"

    def request(self, group: str) -> RequestView:
        return RequestView(group, 0, initial_class(self._group_lengths(group), self.bounds()))

    def budgets(self, requests: Sequence[RequestView]) -> list[int]:
        predictions = [self.predict(view) for view in requests]
        remaining = [
            max(1.0, prediction.length - view.generated)
            for prediction, view in zip(predictions, requests, strict=True)
        ]
        cfg = self.config
        if cfg.rule == "marginal":
            rates = [self.rate(view.group) for view in requests]
            return marginal_budgets(remaining, rates, self.cost, cfg.max_budget)
        # The closed form keeps the paper's rule: Short requests draft nothing.
        drafting = [prediction.length_class != LengthClass.SHORT for prediction in predictions]
        models = [self.acceptance(view.group) for view in requests]
        return step_budgets(remaining, models, drafting, self.cost, cfg.max_budget)

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        _check_step(drafted, accepted)
        if drafted == 0:
            return
        if self.config.rule == "marginal":
            rate = self._rates.get(group)
            if rate is None:
                rate = self._rates[group] = ContinuationRate(self.config.decay)
            rate.observe(drafted, accepted)
            self._pooled_rate.observe(drafted, accepted)
            return
        fitted = self._groups.get(group)
        if fitted is None:
            fitted = self._groups[group] = _Fitted(AcceptanceEstimator(self.config.decay))
        fitted.estimator.observe(drafted, accepted)
        self._pooled.estimator.observe(drafted, accepted)

    def observe_finished(self, group: str, length: int) -> None:
        _check_length(length)
        lengths = self._lengths.get(group)
        if lengths is None:
            lengths = self._lengths[group] = deque(maxlen=self.config.history)
        lengths.append(length)
        self._bounds_stale = True

    def predict(self, view: RequestView) -> Prediction:
        lengths = self._group_lengths(view.group)
        cfg = self.config
        length = predict_length(
            lengths, view.generated, cfg.length_quantile, cfg.prior_length, cfg.tail_growth
        )
        cls = current_class(
            view.initial_class, view.generated, lengths, self.bounds(), cfg.length_quantile
        )
        return Prediction(length, cls)

    def rate(self, group: str) -> float:
        """The group's per-token acceptance; its prior is the rate of all groups."""
        cfg = self.config
        pooled = self._pooled_rate.rate(cfg.prior_rate, cfg.prior_weight)
        rate = self._rates.get(group)
        return pooled if rate is None else rate.rate(pooled, cfg.prior_weight)

    def acceptance(self, group: str) -> Acceptance:
        """The group's fitted acceptance model; its prior is the model fitted to all groups."""
        prior = self._fit(self._pooled, Acceptance(self.config.prior_k, self.config.prior_alpha))
        fitted = self._groups.get(group)
        return prior if fitted is None else self._fit(fitted, prior)

    def bounds(self) -> ClassBounds | None:
        if self._bounds_stale:
            pooled = [length for lengths in self._lengths.values() for length in lengths]
            cfg = self.config
            self._bounds = class_bounds(pooled, cfg.short_quantile, cfg.long_quantile)
            self._bounds_stale = False
        return self._bounds

    def _group_lengths(self, group: str) -> Sequence[int]:
        return self._lengths.get(group, ())

    def _fit(self, fitted: _Fitted, prior: Acceptance) -> Acceptance:
        seen = fitted.estimator.observations
        if fitted.model is None or seen - fitted.fitted_at >= self.config.refit_every:
            density, share, weight = fitted.estimator.points()
            fitted.model = fit_acceptance(density, share, weight, prior, self.config.prior_weight)
            fitted.fitted_at = seen
        return fitted.model


def _check_step(drafted: int, accepted: int) -> None:
    if not 0 <= accepted <= drafted:
        raise ValueError(f"need 0 <= accepted <= drafted, got {accepted}, {drafted}")


def _check_length(length: int) -> None:
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")


# -- parsing -------------------------------------------------------------------------------

_MAX_FIXED = 1024


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A parsed policy name: "none", "fixed:K" (1 <= K <= 1024), "das" or "das-eq7"."""

    kind: str  # "none", "fixed", "das" or "das-eq7"
    budget: int = 0  # K of fixed:K

    def __str__(self) -> str:
        return f"fixed:{self.budget}" if self.kind == "fixed" else self.kind


def parse_policy_spec(spec: str) -> PolicySpec:
    text = spec.strip()
    if text in ("none", "das", "das-eq7"):
        return PolicySpec(text)
    name, sep, arg = text.partition(":")
    if name == "fixed" and sep:
        if not arg.isdecimal():
            raise ValueError(f"fixed:K needs a whole number K, got {spec!r}")
        budget = int(arg)
        if not 1 <= budget <= _MAX_FIXED:
            raise ValueError(f"fixed:K needs 1 <= K <= {_MAX_FIXED} (none for 0), got {spec!r}")
        return PolicySpec("fixed", budget)
    raise ValueError(f"unknown policy {spec!r}: expected none, fixed:K, das or das-eq7")


def parse_policy(
    spec: str, cost: CostModel = SMOLLM2_CPU, config: DasConfig | None = None
) -> Policy:
    """A fresh policy object from its name: "none", "fixed:K", "das" or "das-eq7" (das with the
    closed-form rule; `config`'s rule is overridden by the name)."""
    parsed = parse_policy_spec(spec)
    if parsed.kind.startswith("das"):
        rule = "eq7" if parsed.kind == "das-eq7" else "marginal"
        return DasPolicy(cost, replace(config or DasConfig(), rule=rule))
    return FixedPolicy(parsed.budget)
