from __future__ import annotations

from collections.abc import Callable

import pytest

from drafter import DrafterConfig, ReferenceSuffixTree, SuffixTree
from drafter.cost import CostCurve, CostModel, LiveStepCost
from drafter.draft import Draft
from drafter.history import TokenTree
from drafter.simulator import (
    EpochReport,
    SimulationResult,
    accepted_tokens,
    baseline_time,
    simulate,
)
from drafter.traces import TraceRecord, synthetic_trace

COST = CostModel(c_base=1.0, c_tok=0.1)
PROMPT = (1, 2, 3, 4, 5)
ANSWER = tuple(range(10, 40))  # 30 distinct tokens: nothing to draft from within itself


@pytest.fixture(params=[SuffixTree, ReferenceSuffixTree], ids=["native", "reference"])
def tree_factory(request: pytest.FixtureRequest) -> Callable[[int], TokenTree]:
    factory: Callable[[int], TokenTree] = request.param
    return factory


def _repeat_trace() -> list[TraceRecord]:
    """One rollout, recorded again word for word in the next epoch."""
    return [TraceRecord("g", 0, PROMPT, ANSWER), TraceRecord("g", 1, PROMPT, ANSWER)]


def test_a_repeated_rollout_accepts_the_whole_fixed_budget(
    tree_factory: Callable[[int], TokenTree],
) -> None:
    result = simulate(_repeat_trace(), "fixed:4", COST, tree_factory=tree_factory)
    first, second = result.epochs
    # Epoch 0: no history and no repetition: one token per forward pass.
    assert (first.steps, first.forwards, first.drafted, first.accepted) == (30, 30, 0, 0)
    assert first.makespan_s == pytest.approx(30 * (1.0 + 0.1))
    # Epoch 1: every step drafts 4 tokens from the epoch-0 rollout, accepts all 4, adds one.
    assert (second.steps, second.forwards, second.drafted, second.accepted) == (6, 6, 24, 24)
    assert second.accepted_per_forward == 4.0
    assert second.tokens_per_forward == 5.0
    assert second.makespan_s == pytest.approx(6 * (1.0 + 0.1 * 5))
    assert second.baseline_s == pytest.approx(30 * 1.1)
    assert second.makespan_ratio == pytest.approx(9.0 / 33.0)


def test_drafts_never_run_past_the_recorded_end(
    tree_factory: Callable[[int], TokenTree],
) -> None:
    result = simulate(_repeat_trace(), "fixed:8", COST, tree_factory=tree_factory)
    second = result.epochs[1]
    # 9 tokens per step to position 27; then the stored rollout has 3 tokens left to draft,
    # all accepted, and the target adds nothing past the end.
    assert (second.steps, second.drafted, second.accepted) == (4, 27, 27)
    assert second.makespan_s == pytest.approx(3 * (1.0 + 0.1 * 9) + (1.0 + 0.1 * 4))


def test_a_batch_drains_as_its_rollouts_finish() -> None:
    trace = [
        TraceRecord("a", 0, PROMPT, ANSWER),
        TraceRecord("b", 0, (8, 9), (50, 51, 52)),
        TraceRecord("a", 1, PROMPT, ANSWER),
        TraceRecord("b", 1, (8, 9), (50, 51, 52)),
    ]
    first, second = simulate(trace, "fixed:4", COST).epochs
    assert first.steps == 30
    assert first.forwards == 33
    # Two live rollouts for 3 steps, then one: c_tok is paid per live row.
    assert first.makespan_s == pytest.approx(3 * (1.0 + 0.2) + 27 * (1.0 + 0.1))
    assert first.baseline_s == pytest.approx(baseline_time([30, 3], COST))
    assert first.makespan_ratio == 1.0
    # Epoch 1: "b" matches its prompt's end in the history (stored as (8, 9, 50, 51, 52)) and
    # drafts its whole output at once; no token is added past its end.
    assert second.steps == 6
    assert second.forwards == 6 + 1
    assert second.accepted == 24 + 3


def test_none_gives_one_token_per_forward_and_ratio_one() -> None:
    trace = synthetic_trace(groups=3, samples=4, epochs=3, seed=3)
    result = simulate(trace, "none", COST)
    for report in (*result.epochs, result.total):
        assert report.drafted == report.accepted == 0
        assert report.tokens_per_forward == 1.0
        assert report.forwards == report.tokens
        assert report.makespan_ratio == 1.0
        assert report.makespan_s == pytest.approx(report.baseline_s)
    for report in result.epochs:
        lengths = [len(r.output) for r in trace if r.epoch == report.epoch]
        assert report.steps == max(lengths)
        assert report.baseline_s == pytest.approx(baseline_time(lengths, COST))


CURVE = CostCurve(((1, CostModel(0.5, 0.3)), (4, CostModel(1.0, 0.05)), (8, CostModel(2.0, 0.02))))


def test_a_cost_curve_times_each_step_for_its_batch() -> None:
    trace = synthetic_trace(groups=3, samples=4, epochs=3, seed=3)
    none = simulate(trace, "none", COST, cost_curve=CURVE)
    for report in none.epochs:
        assert report.makespan_s == pytest.approx(report.baseline_s)
        lengths = [len(r.output) for r in trace if r.epoch == report.epoch]
        # Brute force: every step priced under the line for the rollouts still running.
        expected = 0.0
        for step in range(max(lengths)):
            rows = sum(length > step for length in lengths)
            expected += CURVE.at(rows).step_time(rows)
        assert report.baseline_s == pytest.approx(expected)
    # A curve that is one line everywhere is that line.
    flat = CostCurve(((1, COST), (8, COST)))
    for policy in ("none", "fixed:4", "das"):
        by_line = simulate(trace, policy, COST).total
        by_flat = simulate(trace, policy, COST, cost_curve=flat).total
        assert by_flat.makespan_s == pytest.approx(by_line.makespan_s)
        assert by_flat.drafted == by_line.drafted
    # das plans with the curve unless told to keep the line; the steps cost the same either way.
    priced = simulate(trace, "das", COST, cost_curve=CURVE)
    kept = simulate(trace, "das", COST, cost_curve=CURVE, price_by_curve=False)
    assert priced.priced_by_curve and not kept.priced_by_curve
    assert priced.total.drafted != kept.total.drafted
    assert priced.to_json()["cost_curve"][1] == {"rows": 4, "c_base": 1.0, "c_tok": 0.05}


def test_a_planner_learns_the_steps_it_is_priced_by() -> None:
    trace = synthetic_trace(groups=3, samples=4, epochs=3, seed=3)
    # Calibrated right, the planner learns nothing new: das drafts as the curve has it.
    by_curve = simulate(trace, "das", COST, cost_curve=CURVE)
    learning = simulate(trace, "das", COST, cost_curve=CURVE, planner=LiveStepCost(CURVE))
    assert learning.total.drafted == by_curve.total.drafted
    assert learning.total.makespan_s == pytest.approx(by_curve.total.makespan_s)
    assert not learning.priced_by_curve
    # Calibrated wrong: draft tokens cost twice what CURVE says (each batch size's step of
    # its rows alone as CURVE has it). Learning, das drafts nearer to what it drafts knowing
    # the truth than planning by the calibration it started from.
    truth = CostCurve(
        ((1, CostModel(0.2, 0.6)), (4, CostModel(0.8, 0.1)), (8, CostModel(1.84, 0.04)))
    )
    assert all(
        truth.at(r).step_time(r) == pytest.approx(CURVE.at(r).step_time(r)) for r in (1, 4, 8)
    )
    knowing = simulate(trace, "das", COST, cost_curve=truth).total
    kept = simulate(trace, "das", COST, cost_curve=truth, planner=CURVE).total
    learned = simulate(trace, "das", COST, cost_curve=truth, planner=LiveStepCost(CURVE)).total
    assert abs(learned.drafted - knowing.drafted) < abs(kept.drafted - knowing.drafted) / 2
    assert learned.makespan_s < kept.makespan_s
    with pytest.raises(ValueError, match="give cost_curve"):
        simulate(trace, "das", COST, planner=LiveStepCost(CURVE))


@pytest.mark.parametrize("policy", ["fixed:4", "das"])
def test_speculation_pays_once_groups_have_history(policy: str) -> None:
    trace = synthetic_trace(groups=3, samples=4, epochs=3, seed=3)
    result = simulate(trace, policy, CostModel(0.06, 0.002))
    assert result.policy == policy
    assert result.synthetic
    for report in result.epochs[1:]:
        assert report.tokens_per_forward > 1.2
        assert report.accepted_per_forward > 0.2
        assert report.makespan_ratio < 1.0
    assert result.total.makespan_ratio < 0.9


@pytest.mark.parametrize(
    ("policy", "config"),
    [
        ("fixed:8", DrafterConfig()),
        ("das", DrafterConfig()),
        ("fixed:16", DrafterConfig(tree_drafts=True, max_depth=24, min_prob=0.05)),
    ],
)
def test_output_tokens_are_never_changed(policy: str, config: DrafterConfig) -> None:
    trace = synthetic_trace(groups=2, samples=4, epochs=3, seed=4)
    result = simulate(trace, policy, CostModel(0.06, 0.002), config, record_outputs=True)
    assert result.outputs is not None
    assert list(result.outputs) == [record.output for record in trace]
    assert result.total.accepted > 0


def test_forward_counts_are_consistent() -> None:
    trace = synthetic_trace(groups=2, samples=5, epochs=2, seed=5)
    result = simulate(trace, "das", CostModel(0.06, 0.002))
    for report in result.epochs:
        assert report.steps <= report.forwards <= report.steps * report.rollouts
        assert report.tokens == report.forwards + report.accepted
        assert report.accepted <= report.drafted
    assert result.outputs is None


def test_simulation_is_deterministic_and_epochs_run_in_order() -> None:
    trace = synthetic_trace(groups=2, samples=3, epochs=3, seed=6)
    shuffled = trace[::-1]
    first = simulate(trace, "das", COST)
    again = simulate(trace, "das", COST)
    assert first.to_json() == again.to_json()
    reordered = simulate(shuffled, "fixed:4", COST, record_outputs=True)
    assert [report.epoch for report in reordered.epochs] == [0, 1, 2]
    assert reordered.outputs == tuple(record.output for record in shuffled)


def test_result_serialises_every_figure() -> None:
    result = simulate(_repeat_trace(), "fixed:4", COST, DrafterConfig(window=2))
    data = result.to_json()
    assert data["synthetic"] is False
    assert data["policy"] == "fixed:4"
    assert data["cost_model"] == {"c_base": 1.0, "c_tok": 0.1}
    assert data["drafter"] == {
        "max_depth": 64,
        "window": 2,
        "max_rollouts_per_group": 64,
        "max_groups": 8192,
        "min_prob": 0.1,
        "tree_drafts": False,
        "live_siblings": True,
        "other_groups": False,
        "extend_threads": 1,
    }
    epochs = data["epochs"]
    assert isinstance(epochs, list)
    assert [epoch["epoch"] for epoch in epochs] == [0, 1]
    total = data["total"]
    assert isinstance(total, dict)
    assert total["epoch"] is None
    assert total["tokens"] == 60
    assert total["makespan_ratio"] == pytest.approx((33 + 9) / 66)
    assert set(total) == {
        "epoch",
        "rollouts",
        "tokens",
        "forwards",
        "steps",
        "drafted",
        "accepted",
        "makespan_s",
        "baseline_s",
        "accepted_per_forward",
        "tokens_per_forward",
        "makespan_ratio",
    }


def test_empty_batches_report_zeros() -> None:
    empty = EpochReport(None, 0, 0, 0, 0, 0, 0, 0.0, 0.0)
    assert (empty.accepted_per_forward, empty.tokens_per_forward, empty.makespan_ratio) == (
        0.0,
        0.0,
        1.0,
    )
    assert baseline_time([], COST) == 0.0
    result = SimulationResult("none", COST, DrafterConfig(), (), False)
    assert result.total == empty


def test_accepted_tokens_follows_the_longest_matching_path() -> None:
    chain = Draft([5, 6, 7, 8], [-1, 0, 1, 2], [1.0] * 4, 4.0, 2)
    assert accepted_tokens(chain, [5, 6, 9, 8, 1]) == [5, 6]
    assert accepted_tokens(chain, [5, 6]) == [5, 6]
    assert accepted_tokens(chain, [4]) == []
    assert accepted_tokens(Draft(), [1, 2]) == []
    # 5 -> (6 -> 7 | 9 -> 3), 4: two branches under 5 and a second root.
    tree = Draft([5, 4, 6, 9, 7, 3], [-1, -1, 0, 0, 2, 3], [0.6, 0.4, 0.3, 0.3, 0.3, 0.2], 2.1, 1)
    assert accepted_tokens(tree, [5, 9, 3, 8]) == [5, 9, 3]
    assert accepted_tokens(tree, [5, 6, 7]) == [5, 6, 7]
    assert accepted_tokens(tree, [4, 6]) == [4]
    assert accepted_tokens(tree, [8]) == []
    assert accepted_tokens(tree, [5, 9]) == [5, 9]


def test_an_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(_repeat_trace(), "greedy", COST)
