"""DasPolicy: DAS's length-aware speculation budgets.

Per group it keeps recent rollout lengths (length classes and predicted remaining lengths,
drafter/lengths.py); per step it hands the live batch's groups, predicted remaining lengths and
classes to its budget rule (drafter/budgets.py), which prices draft tokens with its own online
acceptance evidence and the worker's cost model:
- "das" (MatchRule, the default): drafts as deep as a token could pay, then trim() cuts each draft
  where its own tokens' calibrated acceptance (from the draft's path probabilities, match
  length and source) stops paying;
- "das-rate" (MarginalRule): each request drafts the tokens that pay for themselves, priced
  with one acceptance rate per group;
- "das-eq7" (ClosedFormRule): the closed form of DESIGN.md.
Replaying real SmolLM2 traces (das simulate) das-rate beat the closed form by 3-6% of makespan
on this CPU's cost model and 19% on the 7B-on-H100 one. das (named das-match until 2026-12-06)
was ahead of das-rate in every measured engine run on a 2-core CPU, at T = 0, 0.7 and 1.0
(README), and level with it on the 7B-on-H100 model.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from drafter.acceptance import Acceptance, DraftCalibrator, check_step
from drafter.budgets import BudgetRule, ClosedFormRule, MarginalRule, MatchRule
from drafter.cost import CostModel
from drafter.draft import Draft
from drafter.lengths import (
    ClassBounds,
    LengthTable,
    Prediction,
    check_length,
    class_bounds,
    current_class,
    initial_class,
    predict_length,
)
from drafter.policy import RequestView

DAS_RULES = ("match", "rate", "eq7")  # the keys of RULES


@dataclass(frozen=True, slots=True)
class DasConfig:
    # "match" (MatchRule: per-token acceptance calibrated from each draft's evidence), "rate"
    # (marginal_budgets over one rate per group) or "eq7" (the closed form, step_budgets)
    rule: str = "match"
    max_budget: int = 16  # most draft tokens one request gets in one verify step
    length_quantile: float = 0.9  # predicted length: this quantile of the group's lengths
    short_quantile: float = 1 / 3  # Short: at most this quantile of all recent lengths
    long_quantile: float = 2 / 3  # Long: above this quantile of all recent lengths
    prior_length: int = 256  # predicted length of a group with no finished rollout yet
    tail_growth: float = 0.5  # past all its group's rollouts: expect this share more
    history: int = 64  # recent lengths kept per group
    prior_rate: float = 0.5  # per-token acceptance (rate) before any evidence...
    prior_k: float = 0.5  # acceptance model (eq7) before any evidence...
    prior_alpha: float = 1.0
    prior_weight: float = 16.0  # ...worth this many verify steps (tried positions) of evidence
    decay: float = 0.995  # per verify step: the weight of older acceptance evidence
    refit_every: int = 8  # verify steps between refits of a group's acceptance model
    # match: the calibrator's decay per verify step (of the whole batch), its priors' weights
    # in tried tokens, the least acceptance chance it ever estimates, and its prior's discount
    # per chain position (DraftCalibrator; picked by replaying the T = 0.7 SmolLM2 trace)
    calibration_decay: float = 0.9995
    coarse_weight: float = 8.0
    fine_weight: float = 8.0
    calibration_floor: float = 0.01
    position_discount: float = 0.5
    # match: the first token of a draft's path below this chance, after a token at least this
    # likely, may be valued at its hope: the lesser of its parent's chance and its own
    # evidence's optimistic estimate (MatchRule's probes; None: none)
    probe_chance: float | None = 0.9
    # match: a token at least this likely to be accepted is priced at what its rejection
    # costs, (1 - chance) * c_tok: accepted, it saves its request computing it later
    # (MatchRule's refunds; None: every token costs c_tok)
    refund_chance: float | None = 0.9

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
        RULES["match"](self)  # raises if a knob of the calibrator or its probes is out of range


# Each DasConfig.rule's budget rule, built from the config.
RULES: dict[str, Callable[[DasConfig], BudgetRule]] = {
    "rate": lambda c: MarginalRule(c.decay, c.prior_rate, c.prior_weight),
    "eq7": lambda c: ClosedFormRule(
        c.decay, Acceptance(c.prior_k, c.prior_alpha), c.prior_weight, c.refit_every
    ),
    "match": lambda c: MatchRule(
        DraftCalibrator(
            c.calibration_decay,
            c.coarse_weight,
            c.fine_weight,
            c.calibration_floor,
            c.position_discount,
        ),
        c.probe_chance,
        c.refund_chance,
    ),
}


# From this many rows up DasPolicy.remaining predicts in one numpy pass (LengthTable): about
# 45 us a step of numpy calls against 1.6 us a row in Python, measured on a 2-core CPU.
_BATCH_ROWS = 32


class DasPolicy:
    """The DAS length-aware budget: per group, recent lengths (the length classes and the
    predicted remaining lengths); per step, the budgets of config.rule for the live batch."""

    drafts = True
    predicts_lengths = True

    def __init__(self, cost: CostModel, config: DasConfig | None = None) -> None:
        self.cost = cost
        self.config = config or DasConfig()
        self.rule = RULES[self.config.rule](self.config)
        self._lengths: dict[str, deque[int]] = {}
        self._bounds: ClassBounds | None = None
        self._bounds_stale = False
        self._table: LengthTable | None = None  # self._lengths as one array, until it changes
        # The last budgets() call's requests and remaining lengths, for trim() to reuse.
        self._last: tuple[Sequence[RequestView], list[float]] | None = None

    @property
    def name(self) -> str:
        return "das" if self.config.rule == "match" else f"das-{self.config.rule}"

    @property
    def trims(self) -> bool:
        """True if trim() may cut drafts (the match rule); False: it returns them as given."""
        return isinstance(self.rule, MatchRule)

    def reprice(self, cost: CostModel) -> None:
        self.cost = cost

    def request(self, group: str) -> RequestView:
        return RequestView(group, 0, initial_class(self._group_lengths(group), self.bounds()))

    def budgets(self, requests: Sequence[RequestView]) -> list[int]:
        groups = [view.group for view in requests]
        remaining = self._remaining(requests, groups)
        self._last = (requests, remaining)
        classes = (
            [self.predict(view).length_class for view in requests]
            if self.rule.uses_length_classes
            else []
        )
        return self.rule.budgets(groups, remaining, classes, self.cost, self.config.max_budget)

    def remaining(self, requests: Sequence[RequestView]) -> list[float]:
        """Each request's predicted remaining tokens (at least 1): predict()'s length less
        what it generated; from _BATCH_ROWS rows up, for all rows in one numpy pass (the
        same floats; below, numpy's fixed cost a call is more than a Python call per row)."""
        return self._remaining(requests, [view.group for view in requests])

    def _remaining(self, requests: Sequence[RequestView], groups: list[str]) -> list[float]:
        if len(requests) < _BATCH_ROWS:  # predict()'s length, without its length class
            length = self._predicted_length
            return [
                max(1.0, length(group, view.generated) - view.generated)
                for view, group in zip(requests, groups, strict=True)
            ]
        cfg = self.config
        if self._table is None:
            self._table = LengthTable(self._lengths)
        generated = np.fromiter((view.generated for view in requests), np.float64, len(requests))
        lengths = self._table.predict(
            groups, generated, cfg.length_quantile, cfg.prior_length, cfg.tail_growth
        )
        remaining: list[float] = np.maximum(1.0, lengths - generated).tolist()
        return remaining

    def trim(self, requests: Sequence[RequestView], drafts: Sequence[Draft]) -> list[Draft]:
        """The step's drafts (one per request, as budgets() sized them) cut where their tokens
        stop paying (the match rule; the other rules return them unchanged). Each kept chain's
        evidence waits for observe_drafts with the same view object."""
        rule = self.rule
        if not isinstance(rule, MatchRule):
            return list(drafts)
        last = self._last
        if last is not None and last[0] is requests:
            remaining = last[1]
        else:
            remaining = self.remaining(requests)
        return rule.trim(requests, drafts, remaining, self.cost)

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        self.rule.observe_step(group, drafted, accepted)

    def observe_draft(
        self,
        request: RequestView,
        drafted: int,
        accepted: int,
        tokens: Sequence[int] | None = None,
    ) -> None:
        """The first `drafted` tokens of the draft trim() returned for `request` (the same view
        object) were verified and `accepted` kept; `tokens`, the tokens the request appended,
        tell which branch of a tree draft that was. Nothing to learn for the other rules."""
        self.observe_drafts([request], [drafted], [accepted], None if tokens is None else [tokens])

    def observe_drafts(
        self,
        requests: Sequence[RequestView],
        drafted: Sequence[int],
        accepted: Sequence[int],
        tokens: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """observe_draft for every row of a verify step, in one call."""
        if isinstance(self.rule, MatchRule):
            self.rule.observe_drafts(requests, drafted, accepted, tokens)
            return
        for n_drafted, n_accepted in zip(drafted, accepted, strict=True):
            check_step(n_drafted, n_accepted)

    def observe_finished(self, group: str, length: int) -> None:
        check_length(length)
        lengths = self._lengths.get(group)
        if lengths is None:
            lengths = self._lengths[group] = deque(maxlen=self.config.history)
        lengths.append(length)
        self._bounds_stale = True
        self._table = None

    def predict(self, view: RequestView) -> Prediction:
        lengths = self._group_lengths(view.group)
        cls = current_class(
            view.initial_class, view.generated, lengths, self.bounds(), self.config.length_quantile
        )
        return Prediction(self._predicted_length(view.group, view.generated), cls)

    def _predicted_length(self, group: str, generated: int) -> float:
        """predict_length of a request of this group that has generated this many tokens."""
        cfg = self.config
        return predict_length(
            self._group_lengths(group),
            generated,
            cfg.length_quantile,
            cfg.prior_length,
            cfg.tail_growth,
        )

    def bounds(self) -> ClassBounds | None:
        if self._bounds_stale:
            pooled = [length for lengths in self._lengths.values() for length in lengths]
            cfg = self.config
            self._bounds = class_bounds(pooled, cfg.short_quantile, cfg.long_quantile)
            self._bounds_stale = False
        return self._bounds

    def _group_lengths(self, group: str) -> Sequence[int]:
        return self._lengths.get(group, ())
