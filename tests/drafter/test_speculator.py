from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest

from drafter import DrafterConfig, RolloutHistory
from drafter.cost import SMOLLM2_CPU, CostCurve, CostModel, LiveStepCost
from drafter.das import DasPolicy
from drafter.draft import HISTORY, Draft
from drafter.groups import group_of, prompt_group
from drafter.lengths import LengthClass
from drafter.policy import FixedPolicy, RequestView
from drafter.speculator import Rollout, Speculator

PROMPT = [1, 2, 3]
ANSWER = [10, 11, 12, 13, 14, 15, 16, 17]


class RecordingPolicy(FixedPolicy):
    """fixed:K that remembers every batch it priced and every step it was told about."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget)
        self.batches: list[list[RequestView]] = []
        self.steps: list[tuple[str, int, int]] = []
        self.finished: list[tuple[str, int]] = []

    def budgets(self, requests: Sequence[RequestView]) -> list[int]:
        self.batches.append(list(requests))
        return super().budgets(requests)

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        super().observe_step(group, drafted, accepted)
        self.steps.append((group, drafted, accepted))

    def observe_finished(self, group: str, length: int) -> None:
        super().observe_finished(group, length)
        self.finished.append((group, length))


def _core(policy: FixedPolicy, max_draft: int = 16) -> tuple[Speculator, list[Rollout]]:
    published: list[Rollout] = []
    history = RolloutHistory(DrafterConfig(max_depth=8))
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)
    return Speculator(history, policy, max_draft=max_draft, publish=published.append), published


def test_a_scripted_batch_drafts_from_history_counts_and_records_natural_ends() -> None:
    policy = RecordingPolicy(4)
    core, published = _core(policy)
    a = core.start("r", "g", PROMPT, sample_index=0)
    b = core.start("r", "g", PROMPT, sample_index=1)
    other = core.start("s", "h", [7, 7, 7])
    assert core.history.active_requests() == 3

    drafts = core.drafts([a, b, other], [16, 2, 16])
    # The group's earlier rollout follows the prompt: its opening is drafted, capped per request.
    assert drafts[0].token_ids == ANSWER[:4]
    assert drafts[1].token_ids == ANSWER[:2]
    assert drafts[2].token_ids == [7, 7, 7, 7][: len(drafts[2])]  # own context only
    assert [len(v) for v in policy.batches] == [3]  # the budgets saw the whole live batch

    # a accepts 3 of its 4 and gets the bonus; b accepts none.
    core.extend(a, [*ANSWER[:3], 99], drafted=4, accepted=3)
    core.extend(b, [50], drafted=2, accepted=0)
    assert (a.counters.forward_passes, a.counters.drafted, a.counters.accepted) == (1, 4, 3)
    assert (b.counters.forward_passes, b.counters.drafted, b.counters.accepted) == (1, 2, 0)
    # Both drafts came from the group's stored rollout: counted under that source.
    assert (a.counters.drafted_by_source, a.counters.accepted_by_source) == (
        {HISTORY: 4},
        {HISTORY: 3},
    )
    assert (b.counters.drafted_by_source, b.counters.accepted_by_source) == (
        {HISTORY: 2},
        {HISTORY: 0},
    )
    assert policy.steps == [("g", 4, 3), ("g", 2, 0)]
    drafts = core.drafts([a, b], [16, 16])
    assert [view.generated for view in policy.batches[-1]] == [4, 1]
    assert drafts[0] == Draft()  # nothing follows a's "99" anywhere: no draft, no source

    # A stop inside the accepted draft: 2 accepted by verification, 1 kept.
    core.extend(a, [5], drafted=3, accepted=2)
    assert a.counters.accepted == 4 and a.output == [*ANSWER[:3], 99, 5]
    # (scripted: the step's draft was empty, so its tokens count under no source)
    assert a.counters.drafted_by_source == {HISTORY: 4}
    assert a.counters.accepted_by_source == {HISTORY: 3}

    rollout = core.finish(a, natural=True)
    assert rollout == Rollout("g", PROMPT, [*ANSWER[:3], 99, 5], 0)
    assert published == [rollout]
    assert core.history.recent_lengths("g") == [len(ANSWER), 5]
    assert policy.finished == [("g", 5)]

    assert core.finish(b, natural=False) is None  # aborted: no history, nothing published
    assert published == [rollout] and core.history.recent_lengths("g") == [len(ANSWER), 5]
    core.finish(other, natural=True)
    assert core.history.recent_lengths("h") == [0]
    assert core.history.active_requests() == 0


def test_no_speculation_builds_no_trees_but_still_records_rollouts() -> None:
    core, published = _core(FixedPolicy(0))
    assert not core.drafting
    request = core.start("r", "g", PROMPT)
    assert core.history.active_requests() == 0
    assert [len(d) for d in core.drafts([request], [16])] == [0]
    core.extend(request, [1, 2], drafted=0, accepted=0)
    assert core.finish(request, natural=True) == Rollout("g", PROMPT, [1, 2], 0)
    assert len(published) == 1 and core.history.recent_lengths("g") == [len(ANSWER), 2]


def test_max_draft_caps_every_draft_and_zero_turns_drafting_off() -> None:
    core, _ = _core(FixedPolicy(8), max_draft=3)
    request = core.start("r", "g", PROMPT)
    assert core.drafts([request], [16])[0].token_ids == ANSWER[:3]
    assert not _core(FixedPolicy(8), max_draft=0)[0].drafting


class ScriptedPolicy(FixedPolicy):
    """Each row's budget from a script, in row order."""

    def __init__(self, budgets: list[int]) -> None:
        super().__init__(max(budgets))
        self.script = budgets

    def budgets(self, requests: Sequence[RequestView]) -> list[int]:
        return list(self.script)


@pytest.mark.parametrize(
    "budgets", [[0, 3, 0, 5, 2], [4, 4, 4, 4, 4], [0, 0, 0, 0, 7], [2, 0, 0, 0, 0]]
)
def test_rows_without_a_budget_get_no_draft_and_the_others_their_own(budgets: list[int]) -> None:
    core, _ = _core(ScriptedPolicy(budgets))
    # Requests at different points of the stored answer, so every row's draft is its own.
    requests = [core.start(f"r{i}", "g", PROMPT) for i in range(len(budgets))]
    for i, request in enumerate(requests):
        core.extend(request, ANSWER[:i], drafted=0, accepted=0)
    drafts = core.drafts(requests, [16] * len(requests))
    expected = [
        core.history.speculate(request.key, budget) if budget else Draft()
        for request, budget in zip(requests, budgets, strict=True)
    ]
    assert drafts == expected
    assert [len(d) for d in drafts] == [min(b, len(ANSWER) - i) for i, b in enumerate(budgets)]


def test_das_reports_the_length_class_predicted_before_the_request_ran() -> None:
    history = RolloutHistory(DrafterConfig(max_depth=8))
    core = Speculator(history, DasPolicy(SMOLLM2_CPU))
    for i, (group, length) in enumerate([("short", 10), ("mid", 100), ("long", 400)] * 3):
        request = core.start(f"r{i}", group, PROMPT)
        core.extend(request, [4] * length, drafted=0, accepted=0)
        core.finish(request, natural=True)
    short = core.start("s", "short", PROMPT)
    assert short.view.initial_class == LengthClass.SHORT
    core.extend(short, [4] * 500, drafted=0, accepted=0)  # runs long: the label stays
    assert core.length_class(short) == "short"
    assert core.length_class(core.start("l", "long", PROMPT)) == "long"
    assert Speculator(history, FixedPolicy(2)).length_class(core.start("x", "g", PROMPT)) == (
        "unknown"
    )


def test_a_cost_curve_reprices_das_for_each_batch_size() -> None:
    curve = CostCurve(((1, CostModel(0.03, 0.005)), (4, CostModel(0.05, 0.001))))
    history = RolloutHistory(DrafterConfig(max_depth=8))
    policy = DasPolicy(SMOLLM2_CPU)
    core = Speculator(history, policy, cost_curve=curve)
    requests = [core.start(f"r{i}", "g", PROMPT) for i in range(4)]
    core.drafts(requests[:1], [8])
    assert policy.cost == curve.at(1)
    core.drafts(requests, [8] * 4)
    assert policy.cost == curve.at(4)
    core.drafts(requests[:3], [8] * 3)
    assert policy.cost == curve.at(3) != curve.at(4)
    # A policy that prices nothing keeps no curve.
    assert Speculator(history, FixedPolicy(2), cost_curve=curve).cost_curve is None


def test_timed_steps_reprice_das_from_the_next_step_where_the_cost_is_live() -> None:
    curve = CostCurve(((1, CostModel(0.03, 0.005)), (4, CostModel(0.05, 0.001))))
    live = LiveStepCost(curve)
    policy = DasPolicy(SMOLLM2_CPU)
    core = Speculator(RolloutHistory(DrafterConfig(max_depth=8)), policy, cost_curve=live)
    requests = [core.start(f"r{i}", "g", PROMPT) for i in range(2)]
    core.drafts(requests, [8, 8])
    assert policy.cost == curve.at(2)
    for _ in range(3):  # the same batch size: only the timings say to reprice
        core.time_step(2, 6, 3 * curve.step_seconds(2, 6))
        core.drafts(requests, [8, 8])
        assert policy.cost == live.at(2) != curve.at(2)
    assert live.timed_steps == 3
    # Under a curve as calibrated the timings change nothing.
    fixed = DasPolicy(SMOLLM2_CPU)
    core = Speculator(RolloutHistory(DrafterConfig(max_depth=8)), fixed, cost_curve=curve)
    requests = [core.start(f"r{i}", "g", PROMPT) for i in range(2)]
    core.drafts(requests, [8, 8])
    core.time_step(2, 6, 3 * curve.step_seconds(2, 6))
    core.drafts(requests, [8, 8])
    assert fixed.cost == curve.at(2)


def test_bad_calls_raise() -> None:
    core, _ = _core(FixedPolicy(2))
    request = core.start("r", "g", PROMPT)
    with pytest.raises(ValueError, match="already active"):
        core.start("r", "g", PROMPT)
    with pytest.raises(ValueError, match="one max_draft per request"):
        core.drafts([request], [])
    with pytest.raises(ValueError, match="accepted <= drafted"):
        core.extend(request, [1], drafted=1, accepted=2)
    with pytest.raises(ValueError, match="empty"):
        core.start("q", "g", [])
    core.finish(request, natural=False)
    with pytest.raises(ValueError, match="has finished"):
        core.extend(request, [1], drafted=0, accepted=0)
    with pytest.raises(ValueError, match="has finished"):
        core.finish(request, natural=True)
    with pytest.raises(ValueError, match="max_draft"):
        Speculator(core.history, FixedPolicy(2), max_draft=-1)


def test_the_prompt_group_is_a_stable_hash_unless_named() -> None:
    assert prompt_group([1, 2, 3]) == prompt_group((1, 2, 3))
    assert prompt_group([1, 2, 3]) != prompt_group([1, 2, 4])
    assert len(prompt_group([5])) == 16
    assert group_of("named", [1, 2]) == "named"
    assert group_of(None, [1, 2]) == prompt_group([1, 2])


def test_the_core_imports_neither_torch_nor_http() -> None:
    code = (
        "import sys, drafter.speculator, drafter.groups, drafter.policy_spec; "
        "bad = [m for m in ('torch', 'fastapi', 'httpx', 'service') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
