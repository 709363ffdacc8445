from __future__ import annotations

import itertools
import math
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter.acceptance import Acceptance, AcceptanceEstimator, ContinuationRate, fit_acceptance
from drafter.budgets import (
    budget_for_forwards,
    forwards_needed,
    marginal_budgets,
    modeled_time,
    optimal_forwards,
    step_budgets,
)
from drafter.cost import SMOLLM2_CPU, SMOLLM2_CPU_STEPS, CostModel
from drafter.das import DasConfig, DasPolicy
from drafter.lengths import (
    ClassBounds,
    LengthClass,
    LengthTable,
    class_bounds,
    current_class,
    initial_class,
    predict_length,
    quantile,
)
from drafter.policy import FixedPolicy, RequestView
from drafter.policy_spec import PolicySpec, parse_policy, parse_policy_spec

COST = CostModel(c_base=0.06, c_tok=0.002)

# -- cost model ----------------------------------------------------------------------------


def test_step_time_is_base_plus_per_token() -> None:
    assert COST.step_time(0) == pytest.approx(0.06)
    assert COST.step_time(10) == pytest.approx(0.08)
    with pytest.raises(ValueError, match="n_tokens"):
        COST.step_time(-1)


@pytest.mark.parametrize(("c_base", "c_tok"), [(0.0, 0.1), (0.1, 0.0), (-1.0, 0.1), (math.nan, 1)])
def test_cost_model_rejects_non_positive_or_nan(c_base: float, c_tok: float) -> None:
    with pytest.raises(ValueError):
        CostModel(c_base, c_tok)


def test_cost_model_fit_recovers_a_line_and_the_stated_smollm2_fit() -> None:
    fitted = CostModel.fit([(1, 0.5 + 0.25), (3, 0.5 + 0.75), (9, 0.5 + 2.25)])
    assert fitted.c_base == pytest.approx(0.5)
    assert fitted.c_tok == pytest.approx(0.25)
    smollm2 = CostModel.fit(SMOLLM2_CPU_STEPS)
    assert smollm2.c_base == pytest.approx(SMOLLM2_CPU.c_base, abs=1e-4)
    assert smollm2.c_tok == pytest.approx(SMOLLM2_CPU.c_tok, abs=1e-5)
    with pytest.raises(ValueError, match="two or more"):
        CostModel.fit([(4, 0.1), (4, 0.2)])


# -- acceptance model and closed form ------------------------------------------------------


def test_acceptance_model_saturates_at_k_times_length() -> None:
    model = Acceptance(k=0.8, alpha=0.5)
    assert model.accepted(0, 100) == 0.0
    assert model.accepted(100, 100) == pytest.approx(80 * (1 - math.exp(-0.5)))
    assert model.accepted(1e6, 100) == pytest.approx(80)
    with pytest.raises(ValueError):
        model.accepted(-1, 100)
    with pytest.raises(ValueError):
        model.accepted(1, 0)


@pytest.mark.parametrize(("k", "alpha"), [(0.0, 1.0), (1.1, 0.5), (0.5, 0.0), (0.9, 1.5)])
def test_acceptance_rejects_invalid_parameters(k: float, alpha: float) -> None:
    with pytest.raises(ValueError):
        Acceptance(k, alpha)


def test_budget_for_forwards_meets_its_forward_count_exactly() -> None:
    model = Acceptance(k=0.7, alpha=0.8)
    assert budget_for_forwards(100, 100, model) == 0.0
    assert budget_for_forwards(100, 150, model) == 0.0
    assert budget_for_forwards(100, 30, model) == math.inf  # below l * (1 - k)
    for forwards in (31.0, 50.0, 99.0):
        budget = budget_for_forwards(100, forwards, model)
        assert forwards_needed(100, budget, model) == pytest.approx(forwards)
    with pytest.raises(ValueError):
        budget_for_forwards(0, 1, model)


def test_modeled_time_counts_base_per_batch_pass_and_every_token() -> None:
    models = [Acceptance(0.5, 1.0), Acceptance(0.5, 1.0)]
    assert modeled_time([10, 4], [0, 0], models, COST) == pytest.approx(0.06 * 10 + 0.002 * 14)
    assert modeled_time([], [], [], COST) == 0.0
    with pytest.raises(ValueError, match="one total draft budget"):
        modeled_time([10, 4], [0], models, COST)
    with pytest.raises(ValueError, match="one acceptance model"):
        modeled_time([10], [0], models, COST)


def _brute_force(
    lengths: list[float], models: list[Acceptance], cost: CostModel, limits: list[int]
) -> tuple[float, tuple[int, ...]]:
    """Minimum of the modeled time over every vector of integer total budgets up to limits."""
    axes = [np.arange(limit + 1, dtype=np.float64) for limit in limits]
    grids = np.meshgrid(*axes, indexing="ij")
    forwards = []
    for length, model, budget in zip(lengths, models, grids, strict=True):
        forwards.append(length - model.k * length * -np.expm1(-model.alpha * budget / length))
    total = cost.c_base * np.maximum.reduce(forwards) + cost.c_tok * (sum(forwards) + sum(grids))
    best = np.unravel_index(int(np.argmin(total)), total.shape)
    return float(total[best]), tuple(int(grid[best]) for grid in grids)


@pytest.mark.parametrize(
    ("lengths", "models", "cost"),
    [
        ([300.0], [Acceptance(0.8, 1.0)], CostModel(0.06, 0.002)),
        ([300.0], [Acceptance(0.5, 0.4)], CostModel(0.06, 0.01)),
        ([200.0, 90.0], [Acceptance(0.8, 1.0), Acceptance(0.8, 1.0)], CostModel(0.06, 0.002)),
        ([150.0, 140.0], [Acceptance(0.9, 1.1), Acceptance(0.6, 0.7)], CostModel(0.05, 0.004)),
        ([120.0, 60.0], [Acceptance(0.6, 1.5), Acceptance(0.95, 0.3)], CostModel(0.03, 0.003)),
    ],
)
def test_closed_form_matches_brute_force_minimum(
    lengths: list[float], models: list[Acceptance], cost: CostModel
) -> None:
    forwards = optimal_forwards(lengths, models, cost)
    closed = [
        budget_for_forwards(length, forwards, m) for length, m in zip(lengths, models, strict=True)
    ]
    limits = [int(1.5 * budget) + 20 for budget in closed]
    best_time, best_budgets = _brute_force(lengths, models, cost, limits)
    assert all(brute < limit for brute, limit in zip(best_budgets, limits, strict=True))
    closed_time = modeled_time(lengths, closed, models, cost)
    # The continuous optimum is at least as good as the best integer vector, and no better
    # than rounding can explain.
    assert closed_time <= best_time + 1e-9
    assert closed_time == pytest.approx(best_time, rel=1e-3)
    for budget, brute in zip(closed, best_budgets, strict=True):
        assert budget == pytest.approx(brute, abs=max(2.0, 0.02 * brute))


def test_optimal_forwards_honours_its_floor_and_trivial_batches() -> None:
    model = Acceptance(0.8, 1.0)
    assert optimal_forwards([], [], COST) == 0.0
    assert optimal_forwards([], [], COST, floor=7.0) == 7.0
    assert optimal_forwards([100.0], [model], COST, floor=500.0) == 500.0
    free = optimal_forwards([100.0], [model], COST)
    assert 100 * (1 - model.k) < free < 100
    assert optimal_forwards([100.0], [model], COST, floor=free + 5) == pytest.approx(free + 5)


GOOD_DRAFTS = Acceptance(0.8, 1.0)


def _budgets(lengths: list[float], model: Acceptance = GOOD_DRAFTS) -> list[int]:
    return step_budgets(lengths, [model] * len(lengths), [True] * len(lengths), COST, 64)


def test_step_budget_of_a_lone_request_is_the_closed_form_spread_over_its_passes() -> None:
    model = Acceptance(0.8, 1.0)
    forwards = optimal_forwards([400.0], [model], COST)
    expected = round(budget_for_forwards(400.0, forwards, model) / forwards)
    assert _budgets([400.0], model) == [expected]
    assert expected > 0
    capped = step_budgets([400.0], [model], [True], COST, max_budget=2)
    assert capped == [2]


def test_larger_batch_never_raises_a_budget() -> None:
    lengths = [400.0, 250.0, 120.0]
    previous = _budgets(lengths)
    for extra in (1, 4, 16, 64):
        budgets = _budgets(lengths + [200.0] * extra)[:3]
        assert all(now <= before for now, before in zip(budgets, previous, strict=True))
        previous = budgets
    # A large batch of equals is compute bound: no drafts pay off; alone, one does.
    assert _budgets([400.0] * 64) == [0] * 64
    assert _budgets([400.0])[0] > 0


def test_longer_predicted_length_never_lowers_a_budget() -> None:
    others = [300.0, 200.0, 200.0, 100.0]
    previous = -1
    for length in (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0):
        budget = _budgets([length, *others])[0]
        assert budget >= previous
        previous = budget
    assert previous > 0


def test_requests_that_may_not_draft_get_zero_and_bound_the_pass_count() -> None:
    model = Acceptance(0.8, 1.0)
    budgets = step_budgets([400.0, 200.0], [model, model], [True, False], COST, 64)
    assert budgets[1] == 0
    assert budgets[0] > 0
    # A non-drafting request as long as the drafting one: nothing to gain by drafting.
    assert step_budgets([400.0, 400.0], [model, model], [True, False], COST, 64) == [0, 0]
    assert step_budgets([400.0], [model], [False], COST, 64) == [0]
    assert step_budgets([400.0], [model], [True], COST, 0) == [0]
    assert step_budgets([], [], [], COST, 16) == []


def test_step_budgets_rejects_bad_arguments() -> None:
    model = Acceptance(0.8, 1.0)
    with pytest.raises(ValueError, match="drafting flag"):
        step_budgets([10.0], [model], [], COST, 4)
    with pytest.raises(ValueError, match="max_budget"):
        step_budgets([10.0], [model], [True], COST, -1)
    with pytest.raises(ValueError, match="> 0"):
        step_budgets([0.0], [model], [True], COST, 4)


# -- lengths and classes -------------------------------------------------------------------


def test_quantile_matches_numpy() -> None:
    values = sorted([5.0, 1.0, 9.0, 3.0, 7.0, 7.0])
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    with pytest.raises(ValueError):
        quantile([], 0.5)
    with pytest.raises(ValueError):
        quantile([1.0], 1.5)


def test_class_bounds_cut_the_workload_at_its_quantiles() -> None:
    assert class_bounds([], 1 / 3, 2 / 3) is None
    bounds = class_bounds(list(range(1, 101)), 0.25, 0.75)
    assert bounds is not None
    assert bounds.classify(10) == LengthClass.SHORT
    assert bounds.classify(50) == LengthClass.MEDIUM
    assert bounds.classify(90) == LengthClass.LONG
    with pytest.raises(ValueError):
        class_bounds([1, 2], 0.8, 0.2)
    with pytest.raises(ValueError):
        ClassBounds(10.0, 5.0)


def test_initial_class_is_the_groups_majority_class() -> None:
    bounds = ClassBounds(100.0, 500.0)
    assert initial_class([], bounds) == LengthClass.MEDIUM
    assert initial_class([50, 60], None) == LengthClass.MEDIUM
    assert initial_class([50, 60, 700], bounds) == LengthClass.SHORT
    assert initial_class([50, 600, 700], bounds) == LengthClass.LONG
    assert initial_class([50, 200], bounds) == LengthClass.MEDIUM  # a tie goes to the longer


def test_predicted_length_conditions_on_what_was_generated() -> None:
    lengths = [100, 200, 300, 400, 1000]
    assert predict_length(lengths, 0, 0.5, 256, 0.5) == pytest.approx(300)
    assert predict_length(lengths, 250, 0.5, 256, 0.5) == pytest.approx(400)
    assert predict_length(lengths, 250, 1.0, 256, 0.5) == pytest.approx(1000)
    # Past every rollout of its group: expect another half of what it already generated.
    assert predict_length(lengths, 1200, 0.9, 256, 0.5) == pytest.approx(1800)
    # No history: the prior, until the request outgrows it.
    assert predict_length([], 0, 0.9, 256, 0.5) == 256
    assert predict_length([], 400, 0.9, 256, 0.5) == pytest.approx(600)
    assert predict_length([], 400, 0.9, 256, 0.0) == 401
    with pytest.raises(ValueError):
        predict_length(lengths, -1, 0.9, 256, 0.5)


@settings(max_examples=200, deadline=None)
@given(
    groups=st.dictionaries(
        st.sampled_from(["a", "b", "c", "d"]), st.lists(st.integers(0, 600), max_size=12)
    ),
    rows=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "new"]), st.integers(0, 700))),
    length_quantile=st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.floats(0.0, 1.0)),
    prior_length=st.sampled_from([1.0, 37.5, 256.0]),
    tail_growth=st.sampled_from([0.0, 0.5, 1.3]),
)
def test_the_length_table_predicts_every_row_as_predict_length_does(
    groups: dict[str, list[int]],
    rows: list[tuple[str, int]],
    length_quantile: float,
    prior_length: float,
    tail_growth: float,
) -> None:
    table = LengthTable(groups)
    got = table.predict(
        [group for group, _ in rows],
        [generated for _, generated in rows],
        length_quantile,
        prior_length,
        tail_growth,
    )
    want = [
        predict_length(groups.get(group, ()), generated, length_quantile, prior_length, tail_growth)
        for group, generated in rows
    ]
    assert got.tolist() == want  # to the last bit: the same floats in the same order
    with pytest.raises(ValueError):
        table.predict(["a"], [-1], 0.9, 256, 0.5)


@pytest.mark.parametrize("rows", [3, 40])  # per row in Python, and in one numpy pass
def test_das_remaining_lengths_follow_each_finished_rollout(rows: int) -> None:
    policy = DasPolicy(SMOLLM2_CPU)
    views = [RequestView("gh"[i % 2], (i * 37) % 400) for i in range(rows)]
    for length in (100, 200, 300):
        policy.observe_finished("g", length)
        want = [max(1.0, policy.predict(view).length - view.generated) for view in views]
        assert policy.remaining(views) == want


def test_class_upgrades_as_the_generated_length_grows() -> None:
    bounds = ClassBounds(100.0, 500.0)
    group = [40, 50, 60, 70]  # a Short group: its predicted length (0.9 quantile) is 67
    steps = [(0, LengthClass.SHORT), (60, LengthClass.SHORT), (68, LengthClass.MEDIUM)]
    steps += [(150, LengthClass.MEDIUM), (501, LengthClass.LONG)]
    for generated, expected in steps:
        assert current_class(LengthClass.SHORT, generated, group, bounds, 0.9) == expected
    # Never below where it started, and without bounds only the group's prediction counts.
    assert current_class(LengthClass.LONG, 0, group, bounds, 0.9) == LengthClass.LONG
    assert current_class(LengthClass.MEDIUM, 100, group, None, 0.9) == LengthClass.LONG
    assert current_class(LengthClass.SHORT, 10, [], None, 0.9) == LengthClass.SHORT


# -- acceptance estimation -----------------------------------------------------------------


def _mean_accepted(drafted: int, model: Acceptance) -> float:
    """Accepted tokens per step at a constant draft length, as the model implies: the share
    a / (a + 1) equals k * (1 - exp(-alpha * d / (a + 1)))."""
    low, high = 0.0, float(drafted)
    for _ in range(100):
        mid = 0.5 * (low + high)
        share = model.k * -math.expm1(-model.alpha * drafted / (mid + 1.0))
        low, high = (mid, high) if mid / (mid + 1.0) < share else (low, mid)
    return low


@pytest.mark.parametrize(("k", "alpha"), [(0.8, 0.9), (0.5, 1.6), (0.95, 0.4), (0.3, 0.5)])
def test_estimator_converges_to_the_model_behind_its_observations(k: float, alpha: float) -> None:
    truth = Acceptance(k, alpha)
    means = {drafted: _mean_accepted(drafted, truth) for drafted in (1, 2, 4, 8, 16)}
    owed = dict.fromkeys(means, 0.0)
    estimator = AcceptanceEstimator(decay=1.0)
    for _ in range(600):
        for drafted, mean in means.items():
            # Whole accepted counts whose running average tracks the model's mean exactly.
            owed[drafted] += mean
            accepted = int(owed[drafted])
            owed[drafted] -= accepted
            estimator.observe(drafted, accepted)
    fitted = fit_acceptance(*estimator.points(), prior=Acceptance(0.5, 1.0), prior_weight=16)
    assert fitted.k == pytest.approx(k, abs=0.02)
    assert fitted.alpha == pytest.approx(alpha, rel=0.05)


def test_estimator_is_robust_to_sampling_noise() -> None:
    truth = Acceptance(0.8, 0.9)
    rng = np.random.default_rng(0)
    estimator = AcceptanceEstimator(decay=0.999)
    for _ in range(600):
        for drafted in (1, 2, 4, 8, 16):
            mean = _mean_accepted(drafted, truth)
            estimator.observe(drafted, int(mean) + int(rng.random() < mean - int(mean)))
    fitted = fit_acceptance(*estimator.points(), prior=Acceptance(0.5, 1.0), prior_weight=16)
    assert fitted.k == pytest.approx(truth.k, abs=0.08)
    assert fitted.alpha == pytest.approx(truth.alpha, rel=0.2)


def test_estimator_without_evidence_returns_the_prior() -> None:
    estimator = AcceptanceEstimator(decay=1.0)
    estimator.observe(0, 0)  # nothing drafted: no evidence
    assert estimator.observations == 0
    prior = Acceptance(0.6, 0.9)
    fitted = fit_acceptance(*estimator.points(), prior=prior, prior_weight=4)
    assert fitted.k == pytest.approx(prior.k, abs=1e-3)
    assert fitted.alpha == pytest.approx(prior.alpha, rel=0.01)


def test_estimator_and_fit_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="decay"):
        AcceptanceEstimator(decay=0.0)
    estimator = AcceptanceEstimator(decay=1.0)
    with pytest.raises(ValueError):
        estimator.observe(2, 3)
    with pytest.raises(ValueError):
        estimator.observe(2, -1)
    prior = Acceptance(0.5, 1.0)
    with pytest.raises(ValueError, match="same length"):
        fit_acceptance([1.0], [0.5, 0.6], [1.0], prior, 1.0)
    with pytest.raises(ValueError, match="prior_weight"):
        fit_acceptance([], [], [], prior, 0.0)


# -- policies ------------------------------------------------------------------------------


def test_parse_policy_spec_accepts_the_policies() -> None:
    assert parse_policy_spec("none") == PolicySpec("none")
    assert parse_policy_spec(" das ") == PolicySpec("das")
    assert parse_policy_spec("das-eq7") == PolicySpec("das-eq7")
    assert parse_policy_spec("fixed:8") == PolicySpec("fixed", 8)
    assert str(parse_policy_spec("fixed:8")) == "fixed:8"
    assert str(parse_policy_spec("das")) == "das"


@pytest.mark.parametrize(
    "spec", ["", "DAS", "fixed", "fixed:", "fixed:0", "fixed:-1", "fixed:x", "fixed:2000", "das:3"]
)
def test_parse_policy_spec_rejects_anything_else(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_policy_spec(spec)


def test_parse_policy_builds_fresh_policies() -> None:
    none = parse_policy("none")
    assert isinstance(none, FixedPolicy)
    assert none.name == "none"
    assert none.budgets([RequestView("g"), RequestView("h", 5)]) == [0, 0]
    fixed = parse_policy("fixed:6", COST)
    assert fixed.name == "fixed:6"
    assert fixed.budgets([RequestView("g")] * 3) == [6, 6, 6]
    das = parse_policy("das")
    assert isinstance(das, DasPolicy)
    assert das.name == "das"
    assert das.cost == SMOLLM2_CPU
    assert das.config == DasConfig(rule="match")  # the default rule
    assert parse_policy("das") is not das
    by_rate = parse_policy("das-rate", COST)
    assert by_rate.name == "das-rate"
    assert by_rate.config == DasConfig(rule="rate")
    eq7 = parse_policy("das-eq7", COST, DasConfig(max_budget=4))
    assert isinstance(eq7, DasPolicy)
    assert eq7.name == "das-eq7"
    assert eq7.config == DasConfig(rule="eq7", max_budget=4)


def test_fixed_policy_checks_what_it_observes() -> None:
    policy = FixedPolicy(3)
    assert policy.request("g") == RequestView("g", 0, LengthClass.MEDIUM)
    policy.observe_step("g", 3, 2)
    policy.observe_finished("g", 40)
    with pytest.raises(ValueError):
        policy.observe_step("g", 1, 2)
    with pytest.raises(ValueError):
        policy.observe_finished("g", -1)
    with pytest.raises(ValueError):
        FixedPolicy(-1)


def test_request_view_advances_and_checks_itself() -> None:
    view = RequestView("g")
    assert (view.generated, view.initial_class) == (0, LengthClass.MEDIUM)
    assert view.advanced(5).advanced(2) == RequestView("g", 7)
    with pytest.raises(ValueError):
        RequestView("g", -1)


RULES = pytest.mark.parametrize("rule", ["rate", "eq7"])


def _trained_das(config: DasConfig | None = None) -> DasPolicy:
    """A DAS policy that has seen a Short, a Medium and a Long group finish, and good drafts."""
    policy = DasPolicy(COST, config)
    for group, lengths in (("short", [20, 30, 25]), ("medium", [150, 200]), ("long", [800, 900])):
        for length in lengths:
            policy.observe_finished(group, length)
        for _ in range(50):
            policy.observe_step(group, 8, 6)
    return policy


@RULES
def test_das_gives_short_requests_less_than_long_ones(rule: str) -> None:
    policy = _trained_das(DasConfig(rule=rule))
    short, long = policy.request("short"), policy.request("long")
    assert short.initial_class == LengthClass.SHORT
    assert long.initial_class == LengthClass.LONG
    assert policy.request("unknown").initial_class == LengthClass.MEDIUM
    crowd = [policy.request("medium") for _ in range(6)]
    budgets = policy.budgets([short, long, *crowd])
    assert budgets[0] < budgets[1] <= policy.config.max_budget
    if rule == "eq7":
        assert budgets[0] == 0  # the closed form never drafts for Short requests
    assert policy.budgets([]) == []


@RULES
def test_das_budgets_grow_as_the_batch_drains(rule: str) -> None:
    policy = _trained_das(DasConfig(rule=rule))
    long = policy.request("long")
    crowd = [policy.request("medium") for _ in range(40)]
    drained = policy.budgets([long])[0]
    crowded = policy.budgets([long, *crowd])[0]
    assert drained > crowded
    assert drained == policy.config.max_budget


def test_das_eq7_upgrades_a_short_request_that_keeps_going() -> None:
    policy = _trained_das(DasConfig(rule="eq7"))
    view = policy.request("short")
    assert policy.predict(view).length_class == LengthClass.SHORT
    assert policy.budgets([view])[0] == 0
    grown = view.advanced(400)
    assert policy.predict(grown).length_class > LengthClass.SHORT
    assert policy.budgets([grown])[0] > 0


def test_das_rate_learns_the_per_token_rate_per_group() -> None:
    policy = DasPolicy(COST, DasConfig(rule="rate", prior_rate=0.5, prior_weight=16))
    assert policy.rule.rate("g") == 0.5
    for _ in range(200):
        policy.observe_step("good", 8, 7)  # 8 positions tried, 7 accepted
        policy.observe_step("bad", 8, 0)  # 1 tried, none accepted
    policy.observe_step("good", 0, 0)  # nothing drafted: ignored
    good, bad = policy.rule.rate("good"), policy.rule.rate("bad")
    assert good == pytest.approx(7 / 8, abs=0.02)
    assert bad < 0.1
    # An unseen group starts from the rate of all groups.
    assert policy.rule.rate("new") == pytest.approx((1400 + 8) / (1800 + 16), rel=0.05)
    bad_alone = policy.budgets([policy.request("bad")])[0]
    assert policy.budgets([policy.request("good")]) == [policy.config.max_budget]
    assert bad_alone <= 1  # a lone request's token costs 3% of a step: one may still pay
    assert policy.budgets([policy.request("bad")] * 40) == [0] * 40


def test_das_eq7_learns_acceptance_per_group() -> None:
    policy = DasPolicy(COST, DasConfig(rule="eq7", refit_every=1))
    prior = policy.rule.acceptance("g")
    assert (prior.k, prior.alpha) == pytest.approx((0.5, 1.0), rel=0.01)
    for _ in range(200):
        policy.observe_step("good", 8, 7)
        policy.observe_step("bad", 8, 0)
    policy.observe_step("good", 0, 0)  # nothing drafted: ignored
    good, bad = policy.rule.acceptance("good"), policy.rule.acceptance("bad")
    assert good.k * good.alpha > 0.5
    assert bad.k < 0.1
    assert policy.budgets([policy.request("bad")]) == [0]
    with pytest.raises(ValueError):
        policy.observe_step("g", 3, 4)
    with pytest.raises(ValueError):
        policy.observe_finished("g", -2)


def test_das_class_bounds_follow_finished_rollouts() -> None:
    policy = DasPolicy(COST)
    assert policy.bounds() is None
    for length in range(1, 31):
        policy.observe_finished("g", length)
    bounds = policy.bounds()
    assert bounds is not None
    assert bounds.short_max == pytest.approx(float(np.quantile(range(1, 31), 1 / 3)))
    history_cap = DasPolicy(COST, DasConfig(history=2))
    for length in (1000, 10, 20):
        history_cap.observe_finished("g", length)
    assert history_cap.predict(RequestView("g")).length == pytest.approx(19)


@pytest.mark.parametrize(
    "knobs",
    [
        {"max_budget": 0},
        {"max_budget": 2000},
        {"length_quantile": 0.0},
        {"short_quantile": 0.7, "long_quantile": 0.3},
        {"long_quantile": 1.0},
        {"prior_length": 0},
        {"tail_growth": -0.1},
        {"history": 0},
        {"prior_k": 0.0},
        {"prior_k": 0.9, "prior_alpha": 2.0},
        {"prior_weight": 0.0},
        {"decay": 1.5},
        {"refit_every": 0},
        {"rule": "closed"},
        {"prior_rate": 1.5},
    ],
)
def test_das_config_checks_itself(knobs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DasConfig(**knobs)  # type: ignore[arg-type]


def test_das_config_defaults_are_the_documented_ones() -> None:
    config = DasConfig()
    assert {f.name for f in fields(config)} >= {"max_budget", "length_quantile", "decay"}
    assert config.max_budget == 16
    assert config.short_quantile < config.long_quantile
    assert _trained_das(config).budgets([RequestView("long", 0, LengthClass.LONG)])[0] > 0


# -- the per-step rule ---------------------------------------------------------------------


def test_continuation_rate_counts_the_positions_a_chain_tried() -> None:
    rate = ContinuationRate(decay=1.0)
    assert rate.rate(0.3, 10.0, 0) == pytest.approx(0.3)
    rate.observe(4, 2, 0)  # tried 3 (two accepted, the third rejected)
    rate.observe(4, 4, 1)  # tried 4, all accepted
    rate.observe(0, 0, 2)  # nothing drafted: no evidence
    assert rate.rate(0.0, 1e-12, 2) == pytest.approx(6 / 7)
    assert rate.rate(0.5, 7.0, 2) == pytest.approx((6 + 3.5) / 14)
    with pytest.raises(ValueError):
        rate.observe(2, 3, 2)
    with pytest.raises(ValueError):
        ContinuationRate(0.0)


def test_continuation_rate_decays_per_step_drafted_or_not() -> None:
    rate = ContinuationRate(decay=0.5)
    rate.observe(4, 0, 3)  # 1 tried, 0 accepted, at step 3
    rate.observe(4, 4, 3)  # the same step: no decay between them
    assert rate.rate(0.0, 1e-12, 3) == pytest.approx(4 / 5)
    # Two steps later with nothing drafted, the evidence weighs a quarter: 1 of 1.25 tried.
    assert rate.rate(0.2, 1.0, 5) == pytest.approx((1 + 0.2) / (1.25 + 1))
    assert rate.rate(0.2, 1.0, 60) == pytest.approx(0.2)  # all but the prior gone


def test_das_rate_drafts_again_after_its_drafts_stopped_paying() -> None:
    # A lone request whose every draft is rejected: the rate falls until a token no longer
    # pays (the floor, c_tok / t_step), then drafting stops; with nothing drafted the evidence
    # decays back toward the prior, and the request drafts again within the steps that decay
    # takes to lift the rate over the floor.
    cost = CostModel(0.040, 0.004)  # a lone request's token costs a tenth of its step
    decay = 0.99
    policy = DasPolicy(cost, DasConfig(rule="rate", prior_rate=0.5, prior_weight=16, decay=decay))
    view = RequestView("g", 0)
    rejected_steps = 0
    while (budget := policy.budgets([view])[0]) > 0:
        policy.observe_step("g", budget, 0)
        view = view.advanced(1)
        rejected_steps += 1
        assert rejected_steps < 1000, "rejecting every draft never stopped drafting"
    # The group and the pooled rate saw the same T rejected positions, and the pooled one is
    # the group's prior: its rate is 0.5 * (16 / (T + 16)) ** 2. It pays again once T has
    # decayed (by `decay` a step) to where that reaches c_tok / t_step.
    floor = cost.c_tok / cost.step_time(1)
    tried = 16 / math.sqrt(policy.rule.rate("g") / 0.5) - 16
    paying = 16 / math.sqrt(floor / 0.5) - 16
    waited = 0
    while policy.budgets([view]) == [0]:
        waited += 1
        assert waited < 10_000, "it never drafted again"
    bound = math.ceil(math.log(paying / tried) / math.log(decay)) + 1
    assert 0 < waited <= bound
    assert rejected_steps > 0


def _best_by_enumeration(
    length: float, total: float, rate: float, cost: CostModel, live: int, cap: int
) -> int:
    """The draft size that maximises expected saved time minus verify cost, by trying all."""
    weight = length / total
    step = cost.c_base + cost.c_tok * live
    gains = [
        sum(rate**j * weight * step - cost.c_tok for j in range(1, n + 1)) for n in range(cap + 1)
    ]
    best = max(gains)
    # Ties (zero-gain tokens) go to the larger draft, as the rule includes them.
    return max(n for n, gain in enumerate(gains) if gain >= best - 1e-12)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(st.floats(1.0, 2000.0), st.floats(0.0, 1.0)), min_size=1, max_size=24),
    c_base=st.floats(0.001, 0.2),
    c_tok=st.floats(1e-5, 0.01),
    cap=st.integers(0, 32),
)
def test_marginal_budgets_are_the_best_draft_sizes(
    rows: list[tuple[float, float]], c_base: float, c_tok: float, cap: int
) -> None:
    cost = CostModel(c_base, c_tok)
    lengths, rates = (list(column) for column in zip(*rows, strict=True))
    budgets = marginal_budgets(lengths, rates, cost, cap)
    total = sum(lengths)
    for length, rate, budget in zip(lengths, rates, budgets, strict=True):
        expected = _best_by_enumeration(length, total, rate, cost, len(rows), cap)
        if budget != expected:
            # Only where a token's gain is zero to rounding may the two disagree.
            weight, step = length / total, cost.step_time(len(rows))
            edge = rate ** max(budget, expected) * weight * step
            assert edge == pytest.approx(c_tok, rel=1e-6)


def test_marginal_budgets_favour_the_long_and_the_alone() -> None:
    cost = CostModel(c_base=0.06, c_tok=0.002)
    long, short = marginal_budgets([400.0, 40.0], [0.6, 0.6], cost, 16)
    assert long > short
    crowded = marginal_budgets([400.0] * 16, [0.6] * 16, cost, 16)[0]
    alone = marginal_budgets([400.0], [0.6], cost, 16)[0]
    assert alone > crowded
    # Alone, a token is worth drafting while 0.6 ** n >= c_tok / t_step = 0.002 / 0.062.
    assert alone == math.floor(math.log(0.002 / 0.062) / math.log(0.6))
    assert marginal_budgets([400.0], [1.0], cost, 16) == [16]
    assert marginal_budgets([400.0], [0.0], cost, 16) == [0]
    assert marginal_budgets([], [], cost, 16) == []


@pytest.mark.parametrize(
    "args",
    [
        ([1.0], [0.5, 0.5], 4),  # ragged
        ([0.0], [0.5], 4),  # no remaining length
        ([1.0], [1.5], 4),  # not a probability
        ([1.0], [0.5], -1),  # negative cap
    ],
)
def test_marginal_budgets_reject_bad_arguments(args: tuple[list[float], list[float], int]) -> None:
    lengths, rates, cap = args
    with pytest.raises(ValueError):
        marginal_budgets(lengths, rates, COST, cap)


def _best_total_by_enumeration(values: list[list[float]], cost: CostModel, live: int) -> float:
    """The most any budgets (a prefix of each request's tokens) gain over what they cost."""
    best = 0.0
    for budgets in itertools.product(*(range(len(row) + 1) for row in values)):
        gain = sum(sum(row[:n]) for row, n in zip(values, budgets, strict=True))
        best = max(best, gain - cost.draft_cost(live, sum(budgets)))
    return best


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(st.floats(1.0, 500.0), st.floats(0.0, 1.0)), min_size=1, max_size=3),
    increments=st.lists(st.floats(0.0, 0.02), min_size=1, max_size=8),
    c_tok=st.floats(1e-4, 0.01),
    cap=st.integers(0, 4),
)
def test_marginal_budgets_with_measured_steps_gain_the_most_any_budgets_can(
    rows: list[tuple[float, float]], increments: list[float], c_tok: float, cap: int
) -> None:
    steps = tuple(itertools.accumulate([0.03 + increments[0], *increments[1:]]))
    cost = CostModel(0.03, c_tok, steps)
    lengths, rates = (list(column) for column in zip(*rows, strict=True))
    budgets = marginal_budgets(lengths, rates, cost, cap)
    total, step, live = sum(lengths), cost.step_time(len(rows)), len(rows)
    values = [
        [rate**n * length / total * step for n in range(1, cap + 1)]
        for length, rate in zip(lengths, rates, strict=True)
    ]
    gain = sum(sum(row[:n]) for row, n in zip(values, budgets, strict=True))
    achieved = gain - cost.draft_cost(live, sum(budgets))
    assert achieved == pytest.approx(_best_total_by_enumeration(values, cost, live), abs=1e-9)


def test_a_lone_request_stops_short_of_a_kernel_change_its_tokens_cannot_pay_for() -> None:
    # One request's steps as measured here: 1-3 tokens on one kernel, 4 and more on another.
    steps = (0.0337, 0.0364, 0.0396, 0.0545, 0.0548, 0.0577, 0.0659, 0.0707, 0.0739)
    cost = CostModel(0.0305, 0.003, steps)
    line = CostModel(0.0305, 0.003)
    # At 45% acceptance the line drafts 3 tokens; the steps stop at 2 (the third costs 15 ms).
    assert marginal_budgets([300.0], [0.45], line, 16) == [3]
    assert marginal_budgets([300.0], [0.45], cost, 16) == [2]
    # Drafts that are nearly always accepted pay for the change together.
    assert marginal_budgets([300.0], [0.97], cost, 16)[0] > 3
