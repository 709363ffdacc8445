"""das: per-token acceptance calibrated from each draft's evidence, and the trim that
cuts drafts where their tokens stop paying (drafter/acceptance.py DraftCalibrator,
drafter/budgets.py MatchRule, DasPolicy.trim)."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter import DrafterConfig, RolloutHistory, _core
from drafter.acceptance import (
    _PROB_PRIORS,
    CELL_BINNING,
    DraftCalibrator,
    match_bin,
    position_bin,
    prob_bin,
    source_bin,
)
from drafter.budgets import MatchRule, paying_count, token_floors, trim_draft
from drafter.cost import CostModel
from drafter.das import DasConfig, DasPolicy
from drafter.draft import Draft
from drafter.policy import FixedPolicy, RequestView, trimmer
from drafter.policy_spec import parse_policy, parse_policy_spec
from drafter.simulator import simulate
from drafter.speculator import Speculator
from drafter.traces import synthetic_trace

# A lone request's token pays when its chance of acceptance is >= c_tok / (c_base + c_tok).
LONE = CostModel(c_base=1.0, c_tok=0.25)  # floor 0.2


def _chain(probs: list[float], match_len: int = 4) -> Draft:
    n = len(probs)
    return Draft(list(range(100, 100 + n)), list(range(-1, n - 1)), probs, sum(probs), match_len)


# -- the calibrator against a brute-force reference ----------------------------------------


def _reference_estimate(
    events: list[tuple[str, object]],
    prob: float,
    position: int,
    match_len: int,
    source: object,
    calibrator: DraftCalibrator,
) -> float:
    """The calibrated chance of one token, recomputed from the whole event list: every tried
    token weighs decay ** (ticks since it was seen); coarse cells pool every match length and
    source; each level is shrunk toward the one above."""
    want_prob, want_pos = prob_bin(prob), position_bin(position)
    want_match, want_source = match_bin(match_len), source_bin(source)

    def counts(pos_bin: int, fine: bool) -> tuple[float, float]:  # accepted, tried
        hits = tried = 0.0
        ticks_after = 0
        for kind, payload in reversed(events):
            if kind == "tick":
                ticks_after += 1
                continue
            probs, match, src, accepted = payload  # type: ignore[misc]
            if fine and (match_bin(match), source_bin(src)) != (want_match, want_source):
                continue
            weight = calibrator.decay**ticks_after
            for i, p in enumerate(probs):
                if (prob_bin(p), position_bin(i)) == (want_prob, pos_bin):
                    hits += weight if i < accepted else 0.0
                    tried += weight
        return hits, tried

    w, v = calibrator.coarse_weight, calibrator.fine_weight
    prior = (1.0, 0.95, 0.825, 0.675, 0.525, 0.375, 0.25, 0.15, 0.075, 0.025)[want_prob]
    for pos_bin in range(want_pos + 1):  # a deeper bin's prior: the bin before it, discounted
        hits, tried = counts(pos_bin, fine=False)
        coarse_estimate = (hits + w * prior) / (tried + w)
        prior = coarse_estimate * calibrator.position_discount
    hits, tried = counts(want_pos, fine=True)
    fine_estimate = (hits + v * coarse_estimate) / (tried + v)
    return max(calibrator.floor, fine_estimate)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    decay=st.sampled_from([1.0, 0.97, 0.8]),
    discount=st.sampled_from([1.0, 0.5]),
)
def test_calibrator_matches_a_brute_force_recount(seed: int, decay: float, discount: float) -> None:
    rng = random.Random(seed)
    calibrator = DraftCalibrator(decay, 3.0, 5.0, floor=0.02, position_discount=discount)
    events: list[tuple[str, object]] = []
    for _ in range(rng.randrange(1, 60)):
        if rng.random() < 0.3:
            calibrator.tick()
            events.append(("tick", None))
            continue
        n = rng.randrange(1, 12)
        probs = sorted((rng.choice([1.0, rng.random()]) for _ in range(n)), reverse=True)
        match, source = rng.randrange(1, 40), rng.choice([None, "", "history", "context", 9])
        accepted = rng.randrange(0, n + 1)
        calibrator.observe(calibrator.cells(probs, match, source), accepted)
        events.append(("draft", (probs, match, source, accepted)))
    for _ in range(20):
        prob, position = rng.random() ** 0.3, rng.randrange(0, 20)
        match, source = rng.randrange(1, 40), rng.choice([None, "history", "siblings"])
        (cell,) = [calibrator.cell(prob, position, match, source)]
        expected = _reference_estimate(events, prob, position, match, source, calibrator)
        assert float(calibrator.table()[cell]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@settings(max_examples=100, deadline=None)
def _chain_estimate(calibrator: DraftCalibrator, probs: list[float], match_len: int) -> list[float]:
    """Each chain token's chance of acceptance, its own estimate or the least before it (as
    MatchRule.trim prices a chain)."""
    table = calibrator.table()
    out: list[float] = []
    for cell in calibrator.cells(probs, match_len):
        out.append(min(out[-1] if out else 1.0, float(table[cell])))
    return out


@settings(max_examples=100, deadline=None)
@given(
    chains=st.lists(
        st.lists(st.integers(0, 1749), min_size=0, max_size=12).flatmap(
            lambda cells: st.tuples(st.just(cells), st.integers(0, len(cells)))
        ),
        max_size=12,
    ),
    seed=st.integers(0, 2**16),
)
def test_observing_many_chains_at_once_equals_observing_each_in_turn(
    chains: list[tuple[list[int], int]], seed: int
) -> None:
    # A few tokens go through the Python loop, many through numpy: both must be observe().
    rng = random.Random(seed)
    together = DraftCalibrator(0.9, 2.0, 2.0, 0.0, 0.5)
    together.observe_outcomes([rng.randrange(1750) for _ in range(30)], [True, False] * 15)
    in_turn = DraftCalibrator(0.9, 2.0, 2.0, 0.0, 0.5)
    in_turn._accepted, in_turn._tried = together._accepted.copy(), together._tried.copy()
    cells = [cell for chain, _ in chains for cell in chain]
    starts = list(itertools.accumulate([len(chain) for chain, _ in chains], initial=0))[:-1]
    together.observe_runs(cells, starts, [len(c) for c, _ in chains], [h for _, h in chains])
    for chain, hits in chains:
        in_turn.observe(chain, hits)
    assert (together._tried == in_turn._tried).all()
    assert (together._accepted == in_turn._accepted).all()
    with pytest.raises(ValueError):
        together.observe_runs([1, 2], [0], [2], [3])


def test_calibrator_estimates_are_non_increasing_along_a_chain_and_learn() -> None:
    calibrator = DraftCalibrator(1.0, coarse_weight=4.0, fine_weight=4.0, floor=0.0)
    probs = [1.0, 1.0, 0.9, 0.5, 0.5, 0.2]
    before = _chain_estimate(calibrator, probs, 8)
    assert before == sorted(before, reverse=True)
    assert before[0] == 1.0  # a path the tree has only ever seen continue, before evidence
    for _ in range(200):
        calibrator.observe(calibrator.cells(probs, 8), 1)  # only the first is ever accepted
    after = _chain_estimate(calibrator, probs, 8)
    assert after == sorted(after, reverse=True)
    assert after[0] > 0.95
    assert after[1] < 0.05  # the second token's cell learned it is always rejected
    # Another match length shares the coarse cell but not the fine one: it moved less.
    other = _chain_estimate(calibrator, probs, 1)
    assert after[1] < other[1] < before[1]


def test_calibrator_rejects_bad_settings_and_observations() -> None:
    for args in [
        (0.0, 1.0, 1.0, 0.0, 1.0),
        (1.0, 0.0, 1.0, 0.0, 1.0),
        (1.0, 1.0, 1.0, 1.5, 1.0),
        (1.0, 1.0, 1.0, 0.0, 0.0),
    ]:
        with pytest.raises(ValueError):
            DraftCalibrator(*args)
    calibrator = DraftCalibrator(1.0, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        calibrator.observe(calibrator.cells([0.5], 2), 2)
    assert source_bin("own") == source_bin(None) == source_bin("") == 0
    assert len({source_bin(name) for name in ("history", "siblings", "context")}) == 3


# -- never stops drafting ------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.99, 0.95])
def test_drafting_resumes_after_a_run_of_rejected_steps(decay: float) -> None:
    policy = DasPolicy(LONE, DasConfig(rule="match", calibration_decay=decay))
    view = RequestView("g", 0)
    probs = [0.95, 0.9, 0.9, 0.8]
    # Reject every draft until the policy stops drafting.
    steps_to_stop = None
    for step in range(10_000):
        requests = [view]
        assert policy.budgets(requests)[0] >= 1  # untried bins keep their priors
        (draft,) = policy.trim(requests, [_chain(probs)])
        if not len(draft):
            steps_to_stop = step
            break
        policy.observe_draft(view, len(draft), 0)
        view = view.advanced(1)
    assert steps_to_stop is not None, "rejecting every token never cut a draft to nothing"
    # Not drafting, the evidence decays back toward the prior (0.95 for the first token): it
    # pays again once its estimate is back over the floor of 0.2. Its rejected tokens weigh T
    # (at most 1 / (1 - decay)), shrinking by `decay` a step, in both of its cells, so its
    # estimate is v * w * 0.95 / ((T + v) * (T + w)): the steps until that reaches 0.2 bound
    # the wait (plus one for rounding).
    cfg = policy.config
    v, w = cfg.fine_weight, cfg.coarse_weight
    weight, bound = 1.0 / (1.0 - decay), 1
    while v * w * 0.95 / ((weight + v) * (weight + w)) < 0.2:
        weight *= decay
        bound += 1
    for _ in range(bound):
        requests = [view]
        policy.budgets(requests)
        (draft,) = policy.trim(requests, [_chain(probs)])
        if len(draft):
            break
        view = view.advanced(1)
    else:
        pytest.fail(f"no draft within {bound} steps after drafting stopped")


def test_a_trimming_policy_with_nothing_to_learn_keeps_every_paying_token() -> None:
    config = DasConfig(rule="match", calibration_floor=0.0, position_discount=1.0)
    policy = DasPolicy(LONE, config)
    view = RequestView("g", 0)
    (draft,) = policy.trim([view], [_chain([1.0, 0.9, 0.5, 0.19, 0.1])])
    # Priors: the bins' middle probabilities 1.0, 0.95, 0.525, 0.15, 0.15 -> kept while >= 0.2.
    assert draft.token_ids == [100, 101, 102]
    assert draft.score == pytest.approx(1.0 + 0.9 + 0.5)


def test_trimming_with_measured_steps_keeps_what_pays_for_a_kernel_change_together() -> None:
    # Priors of this chain's bins: 1.0, 0.95, 0.525, 0.15, 0.15 (the test above). Worth, alone
    # in a 1.25 s step: 1.25, 1.19, 0.66, 0.19, 0.19 s.
    # No probe (the third token would be worth its hope, 0.99 s: tested below).
    chain = _chain([1.0, 0.9, 0.5, 0.19, 0.1])
    config = DasConfig(
        rule="match", calibration_floor=0.0, position_discount=1.0, probe_chance=None
    )
    line = CostModel(1.0, 0.25)  # a token pays while worth >= 0.25 s: 3 of them
    jump = replace(line, steps=(1.0, 1.1, 1.2, 2.2, 2.3, 2.4))  # the 3rd token costs 1.0 s
    (kept,) = DasPolicy(line, config).trim([RequestView("g", 0)], [chain])
    assert len(kept) == 3
    (kept,) = DasPolicy(jump, config).trim([RequestView("g", 0)], [chain])
    assert len(kept) == 2  # 1.25 + 1.19 - 0.2 beats 1.25 + 1.19 + 0.66 - 1.2 and the rest
    cheap = replace(line, steps=(1.0, 1.1, 1.2, 1.3, 1.4, 1.5))  # 0.1 s each: all five pay
    (kept,) = DasPolicy(cheap, config).trim([RequestView("g", 0)], [chain])
    assert len(kept) == 5


# -- trimming only shortens ----------------------------------------------------------------


@st.composite
def _drafts(draw: st.DrawFn) -> Draft:
    n = draw(st.integers(0, 24))
    chain = draw(st.booleans())
    parents: list[int] = []
    probs: list[float] = []
    for i in range(n):
        parent = i - 1 if chain else draw(st.integers(-1, i - 1))
        above = 1.0 if parent < 0 else probs[parent]
        parents.append(parent)
        probs.append(above * draw(st.floats(0.05, 1.0)))
    tokens = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    return Draft(tokens, parents, probs, sum(probs), draw(st.integers(1 if n else 0, 60)))


@settings(max_examples=200, deadline=None)
@given(
    drafts=st.lists(_drafts(), min_size=1, max_size=6),
    lengths=st.lists(st.floats(1.0, 800.0), min_size=6, max_size=6),
    outcomes=st.lists(st.integers(0, 24), max_size=40),
    c_tok=st.floats(1e-4, 0.5),
    probe_chance=st.sampled_from([None, 0.5, 0.9]),
)
def test_trimming_only_shortens_and_keeps_parents_valid(
    drafts: list[Draft],
    lengths: list[float],
    outcomes: list[int],
    c_tok: float,
    probe_chance: float | None,
) -> None:
    rule = MatchRule(DraftCalibrator(0.9, 2.0, 2.0, 0.0), probe_chance)
    cost = CostModel(0.01, c_tok)
    for accepted in outcomes:  # some evidence first
        cells = rule.calibrator.cells([0.9] * 24, 5)
        rule.calibrator.observe(cells, accepted)
    views = [RequestView("g", i) for i in range(len(drafts))]
    trimmed = rule.trim(views, drafts, lengths[: len(drafts)], cost)
    for original, cut in zip(drafts, trimmed, strict=True):
        assert len(cut) <= len(original)
        if original and not cut:
            assert cut == Draft()  # cut to nothing
            continue
        assert all(-1 <= p < i for i, p in enumerate(cut.parents))
        assert cut.match_len == original.match_len
        assert cut.score == pytest.approx(sum(cut.probs))
        if original.is_chain():
            assert cut.is_chain()
            assert cut.token_ids == original.token_ids[: len(cut)]
            assert cut.probs == original.probs[: len(cut)]
            continue
        # A tree: each kept node is an original node whose parent was kept too, in order.
        mapping: list[int] = []
        j = 0
        for i in range(len(cut)):
            while (original.token_ids[j], original.probs[j]) != (cut.token_ids[i], cut.probs[i]):
                j += 1
            parent = original.parents[j]
            assert cut.parents[i] == (-1 if parent < 0 else mapping.index(parent))
            mapping.append(j)
            j += 1


def _reference_optimistic(calibrator: DraftCalibrator, cell: int) -> float:
    """One standard deviation above the mean of Beta(a, b) = Beta(1 + accepted, 1 +
    rejected), from the cell's own counts (in the implementation's float order: a tie
    between two tokens' values must break the same way)."""
    accepted = float(calibrator._accepted.reshape(-1)[cell])
    rejected = max(float(calibrator._tried.reshape(-1)[cell]) - accepted, 0.0)
    a, b = 1.0 + accepted, 1.0 + rejected
    n = a + b
    return a / n + math.sqrt(a * b / (n * n * (n + 1.0)))


def _reference_trim(
    calibrator: DraftCalibrator,
    drafts: list[Draft],
    lengths: list[float],
    cost: CostModel,
    probe_chance: float | None = None,
    refund_chance: float | None = None,
) -> tuple[list[Draft], list[list[int]]]:
    """MatchRule.trim token by token: each token's chance is the least table estimate on its
    path (itself and its ancestors, each at its depth), worth chance * w * t_step; with
    probe_chance, a token below it whose parent is not is worth its hope instead where that is
    more (the lesser of its parent's chance and its cell's optimistic estimate); with
    refund_chance, a token at least that likely is worth chance * c_tok more; the step's
    tokens best first (a stable sort), paying_count of them kept; the kept drafts (a draft cut
    to nothing: Draft()) and their cells."""
    table = calibrator.table()
    tokens = []
    cells_of = []
    for row, draft in enumerate(drafts):
        depth: list[int] = []
        cells = []
        chance: list[float] = []
        parents_seen: set[int] = set()  # in a tree, only a parent's first child may probe
        for i, parent in enumerate(draft.parents):
            depth.append(0 if parent < 0 else depth[parent] + 1)
            cells.append(calibrator.cell(draft.probs[i], depth[i], draft.match_len, draft.source))
            above = 1.0 if parent < 0 else chance[parent]
            chance.append(min(above, float(table[cells[i]])))
            valued = chance[i]
            first_child = parent not in parents_seen
            parents_seen.add(parent)
            if (
                probe_chance is not None
                and parent >= 0
                and first_child
                and above >= probe_chance > valued
            ):
                hope = min(_reference_optimistic(calibrator, cells[i]), above)
                valued = max(valued, hope)
            worth = valued * lengths[row] / sum(lengths) * cost.step_time(len(lengths))
            if refund_chance is not None and valued >= refund_chance:
                worth += valued * cost.c_tok
            tokens.append((worth, row, i))
        cells_of.append(cells)
    tokens.sort(key=lambda token: -token[0])
    taken = tokens[: paying_count([worth for worth, _, _ in tokens], len(lengths), cost)]
    keep = [[False] * len(draft) for draft in drafts]
    for _, row, i in taken:
        keep[row][i] = True
    trimmed = [trim_draft(draft, kept) for draft, kept in zip(drafts, keep, strict=True)]
    trimmed = [
        cut if len(cut) or not len(draft) else Draft()
        for draft, cut in zip(drafts, trimmed, strict=True)
    ]
    cells = [
        [c for c, k in zip(cells, kept, strict=True) if k]
        for cells, kept in zip(cells_of, keep, strict=True)
    ]
    return trimmed, cells


@settings(max_examples=200, deadline=None)
@given(
    drafts=st.lists(_drafts(), min_size=1, max_size=8),
    sources=st.lists(
        st.sampled_from(["", "history", "siblings", "context", "other_groups", "unknown"]),
        min_size=8,
    ),
    lengths=st.lists(st.sampled_from([1.0, 50.0, 50.0, 120.5, 400.0]), min_size=8, max_size=8),
    evidence=st.lists(st.tuples(st.integers(0, 1749), st.booleans()), max_size=400),
    c_tok=st.floats(1e-4, 0.5),
    steps=st.booleans(),
    probe_chance=st.sampled_from([None, 0.5, 0.9]),
    refund_chance=st.sampled_from([None, 0.5, 0.9]),
)
def test_trimming_equals_a_token_by_token_reference(
    drafts: list[Draft],
    sources: list[str],
    lengths: list[float],
    evidence: list[tuple[int, bool]],
    c_tok: float,
    steps: bool,
    probe_chance: float | None,
    refund_chance: float | None,
) -> None:
    drafts = [replace(d, source=s) for d, s in zip(drafts, sources[: len(drafts)], strict=True)]
    lengths = lengths[: len(drafts)]  # few distinct: ties across rows
    rule = MatchRule(DraftCalibrator(0.9, 2.0, 2.0, 0.0, 0.5), probe_chance, refund_chance)
    # Evidence in any cells (a deeper token may be estimated above the one before it).
    rule.calibrator.observe_outcomes([c for c, _ in evidence], [hit for _, hit in evidence])
    cost = CostModel(0.01, c_tok)
    if steps:  # one request's steps timed, with a jump at the fourth token
        cost = replace(cost, steps=(0.01, 0.011, 0.012, 0.03, 0.031))
    views = [RequestView("g", i) for i in range(len(drafts))]
    reference = MatchRule(DraftCalibrator(0.9, 2.0, 2.0, 0.0, 0.5))
    reference.calibrator._accepted = rule.calibrator._accepted.copy()
    reference.calibrator._tried = rule.calibrator._tried.copy()
    want, want_cells = _reference_trim(
        reference.calibrator, drafts, lengths, cost, probe_chance, refund_chance
    )
    got = rule.trim(views, drafts, lengths, cost)
    assert got == want
    for view, draft, cells in zip(views, got, want_cells, strict=True):
        pending = rule.pending(view)
        assert (pending is None) == (len(draft) == 0)
        if pending is not None:
            assert pending[0] == cells


@settings(max_examples=200, deadline=None)
@given(
    drafts=st.lists(_drafts(), min_size=1, max_size=8),
    lengths=st.lists(st.sampled_from([1.0, 50.0, 120.5, 400.0]), min_size=8, max_size=8),
    evidence=st.lists(st.tuples(st.integers(0, 1399), st.booleans()), max_size=400),
    c_tok=st.floats(1e-4, 0.5),
    max_budget=st.integers(1, 24),
    probe_chance=st.sampled_from([None, 0.5, 0.9]),
)
def test_budgets_never_rule_out_a_token_trim_would_keep(
    drafts: list[Draft],
    lengths: list[float],
    evidence: list[tuple[int, bool]],
    c_tok: float,
    max_budget: int,
    probe_chance: float | None,
) -> None:
    lengths = lengths[: len(drafts)]
    rule = MatchRule(DraftCalibrator(0.9, 2.0, 2.0, 0.0, 0.5), probe_chance)
    rule.calibrator.observe_outcomes([c for c, _ in evidence], [hit for _, hit in evidence])
    cost = CostModel(0.01, c_tok)
    budgets = rule.budgets(["g"] * len(drafts), lengths, [], cost, max_budget)
    assert all(0 <= budget <= max_budget for budget in budgets)
    # The drafts here may be longer than max_budget: a budget at max_budget caps nothing more.
    views = [RequestView("g", i) for i in range(len(drafts))]
    for cut, budget in zip(rule.trim(views, drafts, lengths, cost), budgets, strict=True):
        depth: list[int] = []
        for parent in cut.parents:
            depth.append(0 if parent < 0 else depth[parent] + 1)
        assert budget == max_budget or max(depth, default=-1) < budget


def test_budgets_with_measured_steps_past_the_batch_only_rule_out_hopeless_requests() -> None:
    rule = MatchRule(DraftCalibrator(0.9, 2.0, 2.0, 0.0, 0.5))
    # A lone request: its tokens may be cheaper than c_tok within the measured steps.
    cost = CostModel(0.01, 0.001, steps=(0.01, 0.0101, 0.0102, 0.03))
    assert rule.budgets(["g"], [100.0], [], cost, 16) == [16]
    # Two rows, one of which no chance can pay for (its floor is above 1).
    cost = CostModel(0.01, 0.02, steps=(0.01, 0.0101, 0.0102, 0.03))
    assert rule.budgets(["g", "g"], [1.0, 1000.0], [], cost, 16) == [0, 16]


def test_trim_draft_drops_descendants_of_dropped_nodes() -> None:
    tree = Draft([1, 2, 3, 4], [-1, 0, -1, 1], [0.6, 0.5, 0.3, 0.4], 1.8, 3)
    cut = trim_draft(tree, [True, False, True, True])
    assert (cut.token_ids, cut.parents) == ([1, 3], [-1, -1])
    assert trim_draft(tree, [True] * 4) is tree


def test_token_floors_follow_the_batch_share_and_step_time() -> None:
    cost = CostModel(0.06, 0.002)
    long, short = token_floors([300.0, 100.0], cost)
    assert long == pytest.approx(0.002 / (0.75 * 0.064))
    assert short == pytest.approx(3 * long)
    # Where not even a certain token pays, the match rule drafts nothing at all.
    rule = MatchRule(DraftCalibrator(1.0, 1.0, 1.0, 0.0))
    crowd = [1.0] * 200 + [300.0]
    budgets = rule.budgets(["g"] * len(crowd), crowd, [], cost, 16)
    assert budgets[0] == 0 and budgets[-1] == 16


@pytest.mark.parametrize("refund_chance", [None, 0.9, 0.99])
def test_a_likely_token_is_priced_at_what_its_rejection_costs(refund_chance: float | None) -> None:
    # Two requests, 1 and 19 tokens left: the short one is the one the batch waits for with
    # chance w = 0.05, in a 0.11 s step, so a token of it saves w * t_step * p = 0.0055 * p,
    # less than c_tok even when certain. Accepted, it also saves computing it later (c_tok * p):
    # with the refund, a token at least refund_chance likely pays while p >= 0.01 / 0.0155.
    cost = CostModel(0.09, 0.01)
    rule = MatchRule(DraftCalibrator(1.0, 1.0, 1.0, 0.0, 1.0), refund_chance=refund_chance)
    remaining = [1.0, 19.0]
    views = [RequestView("g", 0), RequestView("g", 5)]
    budgets = rule.budgets(["g", "g"], remaining, [], cost, 16)
    # Priors of the chain's bins: 1.0, 0.95, 0.525 (the running minimum, each token's chance).
    short, long = rule.trim(
        views, [_chain([1.0, 0.9, 0.5]), _chain([1.0, 0.9, 0.5])], remaining, cost
    )
    assert len(long) == 3  # 0.95 * 0.11 * 0.525 >= 0.01 with or without the refund
    refunded = {None: 0, 0.9: 2, 0.99: 1}[refund_chance]  # the tokens at least that likely
    assert len(short) == refunded
    assert (budgets[0] > 0) == (refund_chance is not None)
    # The refunded floor, f / (1 + f) of the floor f, is c_tok / (w * t_step + c_tok).
    floors = [f / (1 + f) for f in token_floors(remaining, cost)]
    assert floors[0] == pytest.approx(0.01 / (0.05 * 0.11 + 0.01))
    assert floors[1] == pytest.approx(0.01 / (0.95 * 0.11 + 0.01))


def test_refund_chance_is_checked() -> None:
    with pytest.raises(ValueError, match="refund_chance"):
        MatchRule(DraftCalibrator(1.0, 1.0, 1.0, 0.0), refund_chance=0.0)
    with pytest.raises(ValueError, match="refund_chance"):
        DasConfig(refund_chance=1.5)


# -- wiring: names, the speculation core and the simulator ---------------------------------


def test_das_is_the_match_rule_and_only_it_trims() -> None:
    assert str(parse_policy_spec("das")) == "das"
    policy = parse_policy("das", LONE)
    assert policy.name == "das" and isinstance(policy.rule, MatchRule)
    assert DasPolicy(LONE).name == "das"  # the default rule
    assert trimmer(policy) is policy
    by_rate = parse_policy("das-rate", LONE)
    assert by_rate.name == "das-rate" and trimmer(by_rate) is None
    assert trimmer(parse_policy("das-eq7", LONE)) is None
    assert trimmer(parse_policy("suffix", LONE)) is None
    assert trimmer(FixedPolicy(4)) is None
    with pytest.raises(ValueError, match="das-rate"):
        parse_policy_spec("das-match")  # its name until das took it
    drafts = [_chain([0.9, 0.1])]
    assert by_rate.trim([RequestView("g")], drafts) == drafts


def test_the_speculation_core_trims_and_feeds_back_what_was_accepted() -> None:
    history = RolloutHistory(DrafterConfig(max_depth=16))
    answer = list(range(10, 30))
    for _ in range(3):
        history.add_rollout("g", answer, version=0, prompt=[1, 2, 3])
    policy = DasPolicy(LONE, DasConfig(rule="match"))
    assert isinstance(policy.rule, MatchRule)
    core = Speculator(history, policy, max_draft=16)
    request = core.start("r", "g", [1, 2, 3])
    (draft,) = core.drafts([request], [16])
    assert draft.token_ids == answer[: len(draft)] and len(draft) > 1
    table_before = policy.rule.calibrator.table().copy()
    core.extend(request, answer[:3], drafted=len(draft), accepted=2)
    assert not (policy.rule.calibrator.table() == table_before).all()


def test_a_policy_replaced_in_the_speculation_core_cuts_and_learns() -> None:
    # The vLLM adapter starts with a placeholder policy and replaces it once its cost model is
    # fitted: the new policy must cut the drafts and receive their outcomes, not the old one.
    history = RolloutHistory(DrafterConfig(max_depth=16))
    answer = list(range(10, 30))
    for _ in range(3):
        history.add_rollout("g", answer, version=0, prompt=[1, 2, 3])
    placeholder = DasPolicy(CostModel(0.001, 1.0))  # a token is hardly ever worth its cost
    core = Speculator(history, placeholder, max_draft=16)
    request = core.start("r", "g", [1, 2, 3])
    assert core.drafts([request], [16]) == [Draft()]
    fitted = DasPolicy(LONE)
    core.policy = fitted
    (draft,) = core.drafts([request], [16])
    assert draft.token_ids == answer[: len(draft)] and len(draft) > 1
    before = fitted.rule.calibrator.table().copy()
    untouched = placeholder.rule.calibrator.table().copy()
    core.extend(request, answer[:3], drafted=len(draft), accepted=2)
    assert not (fitted.rule.calibrator.table() == before).all()
    assert (placeholder.rule.calibrator.table() == untouched).all()


@pytest.mark.parametrize(
    "config",
    [DrafterConfig(), DrafterConfig(tree_drafts=True, max_depth=24, min_prob=0.05)],
    ids=["chains", "trees"],
)
def test_the_simulator_stays_lossless_under_das(config: DrafterConfig) -> None:
    trace = synthetic_trace(groups=2, samples=4, epochs=3, seed=4)
    result = simulate(trace, "das", CostModel(0.06, 0.002), config, record_outputs=True)
    assert result.policy == "das"
    assert result.outputs is not None
    assert list(result.outputs) == [record.output for record in trace]
    assert result.total.accepted > 0
    assert result.total.makespan_ratio < 1.0


def test_a_tree_draft_teaches_the_calibrator_its_accepted_path() -> None:
    rule = MatchRule(DraftCalibrator(1.0, 1.0, 1.0, 0.0, position_discount=1.0))
    # Two branches after the context: 1 -> 3 and 2; the target takes 1 then 3.
    tree = Draft([1, 2, 3], [-1, -1, 0], [0.6, 0.4, 0.6], 1.6, 5)
    view = RequestView("g", 0)
    (kept,) = rule.trim([view], [tree], [100.0], CostModel(1.0, 1e-6))
    assert kept == tree
    cells = [rule.calibrator.cell(p, d, 5) for p, d in ((0.6, 0), (0.4, 0), (0.6, 1))]
    before = rule.calibrator.table()[cells].copy()
    rule.observe_drafts([view], [3], [2], [[1, 3, 9]])
    after = rule.calibrator.table()[cells]
    assert after[0] > before[0] and after[2] > before[2]  # on the accepted path
    assert after[1] < before[1]  # the sibling branch was tried and not taken
    # Without the appended tokens a tree's branch is unknown: nothing is learned.
    rule.trim([view], [tree], [100.0], CostModel(1.0, 1e-6))
    rule.observe_drafts([view], [3], [2])
    assert (rule.calibrator.table()[cells] == after).all()


@settings(max_examples=150, deadline=None)
@given(
    drafts=st.lists(_drafts(), min_size=1, max_size=8),
    outcomes=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=8, max_size=8),
    appended=st.lists(st.lists(st.integers(0, 50), max_size=6), min_size=8, max_size=8),
    c_tok=st.floats(1e-4, 0.05),
)
def test_a_step_observed_at_once_equals_each_row_observed_in_turn(
    drafts: list[Draft],
    outcomes: list[tuple[int, int]],
    appended: list[list[int]],
    c_tok: float,
) -> None:
    rows = len(drafts)
    rule = MatchRule(DraftCalibrator(0.9, 2.0, 2.0, 0.0, 0.5))
    rule.calibrator.observe_outcomes([3, 40, 900], [True, False, True])  # some evidence first
    views = [RequestView("g", i) for i in range(rows)]
    kept = rule.trim(views, drafts, [50.0] * rows, CostModel(0.01, c_tok))
    # Each row: verified up to its kept draft's length, accepted up to that (any split).
    drafted = [min(a, len(draft)) for (a, _), draft in zip(outcomes, kept, strict=False)]
    accepted = [min(b, d) for (_, b), d in zip(outcomes, drafted, strict=False)]
    tokens = appended[:rows]
    # The reference: every pending row's cells fed to a twin calibrator one row at a time.
    twin = DraftCalibrator(0.9, 2.0, 2.0, 0.0, 0.5)
    twin._accepted = rule.calibrator._accepted.copy()
    twin._tried = rule.calibrator._tried.copy()
    for view, n_drafted, n_accepted, row in zip(views, drafted, accepted, tokens, strict=True):
        pending = rule.pending(view)
        if not n_drafted or pending is None:
            continue
        cells, tree = pending
        if tree is None:
            twin.observe(cells[:n_drafted], min(n_accepted, n_drafted))
        elif n_drafted >= len(tree):
            on_path, node = [False] * len(tree), -1
            for token in row[:n_accepted]:
                children = [i for i, p in enumerate(tree.parents) if p == node]
                node = next((i for i in children if tree.token_ids[i] == token), -2)
                if node < 0:
                    break
                on_path[node] = True
            twin.observe_outcomes(cells, on_path)
    rule.observe_drafts(views, drafted, accepted, tokens)
    assert (rule.calibrator._tried == twin._tried).all()  # the same floats, bit for bit
    assert (rule.calibrator._accepted == twin._accepted).all()
    for view, n_drafted in zip(views, drafted, strict=True):  # each verified one observed once
        assert not n_drafted or rule.pending(view) is None
    with pytest.raises(ValueError):
        rule.observe_drafts(views, [1] * rows, [2] * rows)


def test_drafts_grow_past_any_fixed_depth_when_every_token_is_accepted() -> None:
    # Four tied requests (w = 1/4): a token pays at an acceptance chance >= 0.25 / 1.5 = 0.17.
    cost = CostModel(c_base=1.0, c_tok=0.125)
    policy = DasPolicy(cost, DasConfig(rule="match"))
    views = [RequestView("g", 0) for _ in range(4)]
    lengths = []
    for _ in range(60):
        drafts = policy.trim(views, [_chain([1.0] * 16, match_len=12)] * 4)
        lengths.append(len(drafts[0]))
        for view, draft in zip(views, drafts, strict=True):
            policy.observe_draft(view, len(draft), len(draft))  # every token accepted
        views = [view.advanced(len(draft) + 1) for view, draft in zip(views, drafts, strict=True)]
    # A deeper position bin's prior is the one before it x 0.5 (the default discount), over
    # the floor of 0.17 while the bin before it does well: each bin that does opens the next.
    assert lengths[0] < 8
    assert lengths[-1] == 16
    assert lengths == sorted(lengths)


def _grown_lengths(probe_chance: float | None, accepted_depth: int) -> list[int]:
    """The lengths das keeps, step by step, of four tied requests' 16-token chains of which the
    target accepts the first accepted_depth tokens, where a token pays only at a chance
    >= 4 * 0.3 / (1 + 4 * 0.3) = 0.55: above the 0.5 x (the first position's estimate) that a
    deeper position's estimate starts from."""
    cost = CostModel(c_base=1.0, c_tok=0.3)
    policy = DasPolicy(cost, DasConfig(rule="match", probe_chance=probe_chance))
    views = [RequestView("g", 0) for _ in range(4)]
    lengths = []
    for _ in range(60):
        drafts = policy.trim(views, [_chain([1.0] * 16, match_len=12)] * 4)
        lengths.append(len(drafts[0]))
        hits = [min(len(draft), accepted_depth) for draft in drafts]
        policy.observe_drafts(views, [len(d) for d in drafts], hits)
        views = [view.advanced(hit + 1) for view, hit in zip(views, hits, strict=True)]
    return lengths


def test_probes_grow_drafts_past_a_floor_above_the_deeper_positions_prior() -> None:
    # Without probes the second position is never tried, so never learned: one token a step
    # however many the target would take.
    assert set(_grown_lengths(None, accepted_depth=16)) == {1}
    # With them, each position that is accepted opens the next.
    lengths = _grown_lengths(0.9, accepted_depth=16)
    assert lengths[0] == 2 and lengths[-1] == 16
    assert lengths == sorted(lengths)


@pytest.mark.parametrize("accepted_depth", [1, 4, 8])
def test_probes_stop_where_the_target_rejects_them(accepted_depth: int) -> None:
    # The target takes the first accepted_depth tokens (a whole position bin: 1, 2, 3-4,
    # 5-8) and rejects the next: drafts grow to that depth, and the one probe past it, rejected
    # for all four requests, is dropped (an optimistic 0.31 against the floor of 0.55).
    lengths = _grown_lengths(0.9, accepted_depth)
    assert lengths.count(accepted_depth + 1) == 1
    assert set(lengths[lengths.index(accepted_depth + 1) + 1 :]) == {accepted_depth}


def _reference_paying_count(values: list[float], live_tokens: int, cost: CostModel) -> int:
    """paying_count by its definition, count by count: the largest count whose summed values
    less what it adds to the step are at least every smaller count's (and 0), within 1e-9
    c_tok; past the measured steps a value below c_tok ends the counts."""
    slack = 1e-9 * cost.c_tok
    limit = len(values)
    for i in range(max(len(cost.steps) - live_tokens, 0), len(values)):
        if values[i] < cost.c_tok - slack:
            limit = i
            break
    taken, best, total = 0, 0.0, 0.0
    for count in range(1, limit + 1):
        total += values[count - 1]
        net = total - cost.draft_cost(live_tokens, count)
        if net >= best - slack:
            taken = count
        best = max(best, net)
    return taken


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 0.05), max_size=40),
    live_tokens=st.integers(1, 8),
    c_tok=st.floats(1e-4, 0.02),
    steps=st.lists(st.floats(0.001, 0.05), max_size=12),
)
def test_paying_count_equals_its_definition(
    values: list[float], live_tokens: int, c_tok: float, steps: list[float]
) -> None:
    values = sorted(values, reverse=True)
    cost = CostModel(0.01, c_tok, steps=tuple(sorted(steps)))
    assert paying_count(values, live_tokens, cost) == _reference_paying_count(
        values, live_tokens, cost
    )


def test_the_native_cut_rejects_arrays_that_do_not_match() -> None:
    rule = MatchRule(DraftCalibrator(1.0, 1.0, 1.0, 0.0))
    view = RequestView("g", 0)
    broken = Draft([1, 2], [-1, 1], [0.9, 0.8], 1.7, 3)  # a parent after its child
    with pytest.raises(ValueError, match="parent"):
        rule.trim([view], [broken], [10.0], LONE)
    table = rule.calibrator.table()
    accepted, tried = rule.calibrator.evidence()
    one_row = np.ones(1, dtype=np.int64)
    arrays = dict(
        sizes=one_row,
        lengths=np.ones(2),  # two rows' lengths for one row
        match_lens=one_row,
        source_bins=np.zeros(1, dtype=np.int64),
        parents=-one_row,
        probs=np.ones(1),
        binning=CELL_BINNING,
        table=table,
        accepted=accepted,
        tried=tried,
        total_remaining=1.0,
        step_time=1.0,
        c_tok=0.1,
        refund_chance=0.0,
        probe_chance=0.0,
        draft_costs=np.ones(1),
        past_steps=0,
    )
    with pytest.raises(ValueError, match="per row"):
        _core.cut_drafts(**arrays)
    arrays["lengths"] = np.ones(1)
    assert _core.cut_drafts(**arrays)[1].tolist() == [1]  # a certain token worth 1 s: kept
    with pytest.raises(ValueError, match="cell"):
        _core.cut_drafts(**{**arrays, "table": table[:-1]})
    with pytest.raises(ValueError, match="source"):
        _core.cut_drafts(**{**arrays, "source_bins": np.full(1, 99, dtype=np.int64)})


def _reference_table(calibrator: DraftCalibrator) -> np.ndarray:
    """DraftCalibrator.table as the numpy formula: each (probability, position) bin's coarse
    estimate over its summed counts, shrunk toward its prior (the bin's middle probability at
    the first position, the coarse estimate before it times position_discount deeper); each
    cell's shrunk toward its coarse bin; at least floor."""
    accepted, tried = calibrator._accepted, calibrator._tried
    coarse_acc, coarse_tried = accepted.sum(axis=(2, 3)), tried.sum(axis=(2, 3))
    w, v = calibrator.coarse_weight, calibrator.fine_weight
    coarse = np.empty(coarse_acc.shape)
    prior = np.asarray(_PROB_PRIORS)
    for j in range(coarse.shape[1]):
        coarse[:, j] = (coarse_acc[:, j] + w * prior) / (coarse_tried[:, j] + w)
        prior = coarse[:, j] * calibrator.position_discount
    fine = (accepted + v * coarse[:, :, None, None]) / (tried + v)
    return np.maximum(fine, calibrator.floor).ravel()


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1.0, 30.0, 1000.0]),
    weights=st.tuples(st.floats(0.5, 16.0), st.floats(0.5, 16.0)),
    floor=st.sampled_from([0.0, 0.01, 0.3]),
    position_discount=st.sampled_from([0.5, 0.8, 1.0]),
)
def test_the_native_table_equals_the_numpy_formula_to_the_bit(
    seed: int,
    scale: float,
    weights: tuple[float, float],
    floor: float,
    position_discount: float,
) -> None:
    calibrator = DraftCalibrator(0.97, *weights, floor, position_discount)
    # Decayed counts, as ticks leave them: fractions, in a sparse half of the cells.
    rng = np.random.default_rng(seed)
    shape = calibrator._tried.shape
    accepted = rng.random(shape) * scale * (rng.random(shape) < 0.5)
    calibrator._accepted = accepted
    calibrator._tried = accepted + rng.random(shape) * scale
    want = _reference_table(calibrator)
    got = calibrator.table()
    assert got.tobytes() == want.tobytes()
    best = np.minimum(want.reshape(shape).max(axis=(0, 2, 3)), 1.0)
    depths = np.searchsorted([1, 2, 4, 8], np.arange(16), side="right")
    ceilings = np.minimum.accumulate(best[depths])
    assert calibrator.depth_ceilings(16).tobytes() == ceilings.tobytes()
    calibrator.observe([0, 0, 1], 2)  # new evidence: a new table
    assert calibrator.table().tobytes() == _reference_table(calibrator).tobytes()
