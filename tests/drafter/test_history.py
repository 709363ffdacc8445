from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter import Draft, DrafterConfig, ReferenceSuffixTree, RolloutHistory, SuffixTree
from drafter.draft import CONTEXT, HISTORY, OTHER_GROUPS, SIBLINGS
from drafter.history import TokenTree

PROMPT = [101, 102, 103, 104]
ANSWER = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]


@pytest.fixture(params=[SuffixTree, ReferenceSuffixTree], ids=["native", "reference"])
def tree_factory(request: pytest.FixtureRequest) -> Callable[[int], TokenTree]:
    factory: Callable[[int], TokenTree] = request.param
    return factory


def make_history(factory: Callable[[int], TokenTree], **knobs: object) -> RolloutHistory:
    return RolloutHistory(DrafterConfig(**knobs), tree_factory=factory)  # type: ignore[arg-type]


@pytest.mark.parametrize("live_siblings", [False, True])
def test_history_drafts_a_rollout_of_the_same_group_from_the_first_token(
    tree_factory: Callable[[int], TokenTree], live_siblings: bool
) -> None:
    history = make_history(tree_factory, live_siblings=live_siblings)
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)
    history.start_request("r", "g", PROMPT)
    draft = history.speculate("r", 6)
    assert draft.token_ids == ANSWER[:6]
    # With live siblings the request's own sequence is in the group tree too, ending at the
    # match: it counts there (2 occurrences) but continues with nothing, so 1/2 each.
    assert draft.probs == [0.5 if live_siblings else 1.0] * 6
    history.extend_request("r", ANSWER[:6])
    assert history.speculate("r", 16).token_ids == ANSWER[6:]


def test_groups_do_not_share_history(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory)
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)
    history.start_request("other", "h", PROMPT)
    assert len(history.speculate("other", 8)) == 0


def test_other_groups_draft_only_where_the_group_and_context_have_nothing(
    tree_factory: Callable[[int], TokenTree],
) -> None:
    history = make_history(tree_factory, other_groups=True)
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)
    history.add_rollout("h", [60, 61, 62, 63], version=0, prompt=[1, 2])
    history.start_request("other", "h", PROMPT)  # h's prompt differs: its rollout matches not
    assert history.speculate("other", 4) == Draft(
        ANSWER[:4], [-1, 0, 1, 2], [1.0] * 4, 4.0, 4, OTHER_GROUPS
    )
    history.extend_request("other", [60, 61])  # now its own group's rollout matches
    draft = history.speculate("other", 4)
    assert (draft.token_ids, draft.source) == ([62, 63], HISTORY)
    history.extend_request("other", [62, 63, 70, 71, 70])  # past h's text: 70, 71 is its own
    draft = history.speculate("other", 2)
    assert (draft.token_ids, draft.source) == ([71, 70], CONTEXT)
    history.stop_request("other")
    assert history.evict_before(1) == 2 and history.num_tokens() == 0  # both trees emptied
    history.add_rollout("g", ANSWER, version=1, prompt=PROMPT)
    for group in range(history.config.max_groups):  # g, idle, is dropped as least recent
        history.add_rollout(f"new{group}", [5], version=1)
    history.start_request("late", "x", PROMPT)
    assert history.speculate("late", 4).token_ids == []  # g's rollout left every tree


def test_request_drafts_from_its_own_context(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory)
    phrase = [40, 41, 42, 43, 44, 45]
    history.start_request("r", "g", [1, 2, *phrase, 3])
    history.extend_request("r", phrase[:2])
    draft = history.speculate("r", 4)
    assert draft.token_ids == phrase[2:6]
    assert draft.match_len == 2


def test_the_better_scoring_draft_wins(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory)
    # Three earlier rollouts continue [5, 6] with 7 (prob 1); the request's own context
    # continues it once with 9 and once with 8 (prob 1/2 each): history wins.
    for _ in range(3):
        history.add_rollout("g", [5, 6, 7, 7, 7], version=0)
    history.start_request("r", "g", [5, 6, 9, 5, 6, 8, 5, 6])
    assert history.speculate("r", 3).token_ids == [7, 7, 7]
    # A context the history never saw: only the request's own tree can draft.
    history.extend_request("r", [30, 31, 32, 30, 31])
    assert history.speculate("r", 3).token_ids == [32, 30, 31]


def test_zero_budget_gives_an_empty_draft(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory)
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)
    history.start_request("r", "g", PROMPT)
    assert len(history.speculate("r", 0)) == 0


def test_window_evicts_old_versions(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory, window=2)
    history.add_rollout("old", [1, 2, 3], version=0)
    history.add_rollout("g", [4, 5, 6, 7], version=0)
    history.add_rollout("g", [4, 5, 6, 8, 9], version=1)
    assert history.set_version(1) == 0
    assert history.recent_lengths("g") == [4, 5]
    assert history.set_version(2) == 2  # version 0 falls out of a 2-version window
    assert history.recent_lengths("g") == [5]
    assert history.groups() == ["g"]
    assert history.recent_lengths("old") == []
    assert not history.add_rollout("g", [1], version=0)  # too old to store
    assert history.recent_lengths("g") == [5]


def test_version_cannot_go_back(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory)
    history.set_version(3)
    with pytest.raises(ValueError, match="must not go back"):
        history.set_version(2)


def test_rollouts_per_group_are_capped(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory, max_rollouts_per_group=3, other_groups=True)
    for length in range(1, 6):
        history.add_rollout("g", list(range(length)), version=0)
    assert history.recent_lengths("g") == [3, 4, 5]
    assert history.num_tokens() == 2 * (3 + 4 + 5)  # the group's tree and every group's


def test_memory_stays_bounded_by_the_window(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory, window=2, other_groups=True)
    tokens_per_version = []
    for version in range(8):
        history.set_version(version)
        for sample in range(4):
            history.add_rollout("g", [version % 5, sample, *range(20)], version=version)
        tokens_per_version.append(history.num_tokens())
    # From version 1 on the history holds exactly two versions of 4 rollouts of 22 tokens, each
    # in its group's tree and in every group's.
    assert tokens_per_version[0] == 2 * 4 * 22
    assert tokens_per_version[1:] == [2 * 2 * 4 * 22] * 7
    assert history.memory_bytes() > 0


def test_groups_past_the_cap_drop_the_least_recently_used(
    tree_factory: Callable[[int], TokenTree],
) -> None:
    """With no weight update the window evicts nothing, so new prompt groups would pile up:
    past max_groups the least recently used group goes (a rollout or a request start uses
    it), except one with a running request in its tree."""
    history = make_history(tree_factory, max_groups=3, live_siblings=True, other_groups=True)
    for group in ("a", "b", "c"):
        history.add_rollout(group, [1, 2, 3], version=0)
    history.add_rollout("a", [4, 5], version=0)  # a is now the most recent: b is the least
    history.add_rollout("d", [6], version=0)
    assert sorted(history.groups()) == ["a", "c", "d"] and history.evicted_groups == 1
    history.start_request("r", "c", [9, 9])  # c is used, and holds a running request
    history.add_rollout("e", [7], version=0)  # the least recent idle one is a
    history.add_rollout("f", [8], version=0)  # then d
    assert sorted(history.groups()) == ["c", "e", "f"] and history.evicted_groups == 3
    history.add_rollout("g", [8], version=0)  # c is the least recent but running: e goes
    assert sorted(history.groups()) == ["c", "f", "g"]
    history.stop_request("r")
    assert history.recent_lengths("c") == [3] and history.recent_lengths("b") == []
    assert history.num_tokens() == 2 * (3 + 1 + 1)  # every group's tree dropped theirs too


def test_group_stats(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory)
    for length in [10, 20, 30, 40, 100]:
        history.add_rollout("g", [1] * length, version=0)
    stats = history.group_stats("g")
    assert (stats.rollouts, stats.tokens, stats.max_length) == (5, 200, 100)
    assert stats.mean_length == 40.0
    assert stats.p50_length == 30.0
    assert stats.p90_length == pytest.approx(76.0)
    assert history.group_stats("unknown").rollouts == 0


def test_request_lifecycle_errors(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory)
    history.start_request("r", "g", PROMPT)
    with pytest.raises(ValueError, match="already active"):
        history.start_request("r", "g", PROMPT)
    assert history.active_requests() == 1
    history.stop_request("r")
    assert history.active_requests() == 0
    with pytest.raises(KeyError):
        history.speculate("r", 4)
    with pytest.raises(KeyError):
        history.extend_request("r", [1])
    with pytest.raises(KeyError):
        history.stop_request("r")


def test_long_requests_keep_a_bounded_context(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory, max_depth=8)
    history.start_request("r", "g", [1, 2, 3])
    for token in range(100):
        history.extend_request("r", [token % 7])
    # The context is cyclic with period 7: the request's own tree drafts the cycle.
    assert history.speculate("r", 5).token_ids == [(100 + i) % 7 for i in range(5)]


@pytest.mark.parametrize(
    "knobs",
    [
        {"max_depth": 1},
        {"window": 0},
        {"max_rollouts_per_group": 0},
        {"max_groups": 0},
        {"min_prob": 1.5},
    ],
)
def test_config_rejects_bad_values(knobs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DrafterConfig(**knobs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    config = DrafterConfig()
    assert (config.max_depth, config.window, config.max_rollouts_per_group) == (64, 8, 64)
    assert (config.min_prob, config.tree_drafts) == (0.1, False)
    assert RolloutHistory().config == config


def test_live_siblings_draft_from_each_others_outputs_so_far(
    tree_factory: Callable[[int], TokenTree],
) -> None:
    history = make_history(tree_factory, live_siblings=True)
    history.start_request("a", "g", PROMPT)
    history.start_request("b", "g", PROMPT)
    history.start_request("other", "h", PROMPT)
    assert history.speculate("b", 4).token_ids == []  # nothing generated anywhere yet
    history.extend_request("a", ANSWER[:6])
    # b has generated nothing: a's first tokens follow the same prompt tail.
    # (b's own empty output follows that tail there too: the prompt's count is 2, a's path 1.)
    chain = [-1, 0, 1, 2]
    assert history.speculate("b", 4) == Draft(ANSWER[:4], chain, [0.5] * 4, 2.0, 4, SIBLINGS)
    assert history.speculate("other", 4).token_ids == []  # another group sees none of it
    assert history.groups() == []  # no stored rollout yet
    history.stop_request("a")  # aborted: its output leaves the group's tree
    assert history.speculate("b", 4).token_ids == []
    history.extend_request("b", ANSWER)
    history.stop_request("b")
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)  # b finished: now a rollout
    history.start_request("c", "g", PROMPT)
    assert history.speculate("c", 4).token_ids == ANSWER[:4]
    assert history.speculate("c", 4).source == HISTORY  # a tie goes to the stored rollouts
    history.extend_request("c", [50, 51, 52, 50, 51])
    # 50, 51 is only in c's own output (in the group tree too, as c is running): context.
    assert history.speculate("c", 4).source == CONTEXT
    assert history.groups() == ["g"]
    history.stop_request("c")
    history.stop_request("other")
    assert history.evict_before(1) == 1 and history.num_tokens() == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=12), min_size=1, max_size=3),
    st.lists(
        st.tuples(st.integers(0, 3), st.lists(st.integers(0, 5), min_size=1, max_size=4)),
        max_size=30,
    ),
    st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=12), max_size=3),
    st.integers(1, 6),
)
def test_live_sibling_drafts_copy_only_what_a_drafter_may_see(
    stored: list[list[int]],
    steps: list[tuple[int, list[int]]],
    elsewhere: list[list[int]],
    budget: int,
) -> None:
    """Every draft (with the context it matched) is a run of one sequence a history drafter
    may see: a stored rollout, a running sibling's output so far, or the request's own. Its
    source is the kind of sequence its match and first token came from: a stored rollout
    (HISTORY); only running requests' outputs, more often than in the request's own prompt
    and output (SIBLINGS); else the request's own (CONTEXT). Another group's rollouts
    (OTHER_GROUPS) draft only where the group's and the request's own text give nothing: the
    drafts are those of a history without them wherever that one drafts."""
    history = RolloutHistory(DrafterConfig(max_depth=12, live_siblings=True, other_groups=True))
    alone = RolloutHistory(DrafterConfig(max_depth=12, live_siblings=True))
    prompt = [9, 9]
    for twin in (history, alone):
        for output in stored:
            twin.add_rollout("g", output, version=0, prompt=prompt)
        for output in elsewhere:
            twin.add_rollout("o", output, version=0, prompt=[8])
    outputs: dict[int, list[int]] = {}
    for live, tokens in steps:
        for twin in (history, alone):
            if live not in outputs:
                twin.start_request(live, "g", prompt)
            twin.extend_request(live, tokens)
        outputs[live] = outputs.get(live, []) + tokens
        if len(outputs) > 1 and live == 3:  # one sibling stops (aborted) now and then
            history.stop_request(live)
            alone.stop_request(live)
            del outputs[live]
        rollouts = [prompt + s for s in stored]
        running = [prompt + o for o in outputs.values()]
        for request, output in outputs.items():
            draft = history.speculate(request, budget)
            without = alone.speculate(request, budget)
            if without.token_ids:
                assert draft == without
            if not draft.token_ids:
                assert draft.source == ""
                continue
            context = (prompt + output)[-12:]
            match = context[len(context) - draft.match_len :]
            run = match + draft.token_ids
            if draft.source == OTHER_GROUPS:
                assert not without.token_ids
                assert any(_contains(s, run) for s in [*rollouts, *([8, *o] for o in elsewhere)])
                continue
            assert any(_contains(s, run) for s in rollouts + running), run
            key = match + draft.token_ids[:1]
            in_rollouts = sum(_count(s, key) for s in rollouts)
            in_running = sum(_count(s, key) for s in running)
            in_own = _count(prompt + output, key)
            if draft.source == HISTORY:
                assert in_rollouts > 0, (key, draft)
            elif draft.source == SIBLINGS:
                assert in_rollouts == 0 and in_running > in_own, (key, draft)
            else:
                assert draft.source == CONTEXT and in_own > 0, (key, draft)


def _count(sequence: list[int], run: list[int]) -> int:
    return sum(sequence[i : i + len(run)] == run for i in range(len(sequence) - len(run) + 1))


def _contains(sequence: list[int], run: list[int]) -> bool:
    return any(sequence[i : i + len(run)] == run for i in range(len(sequence) - len(run) + 1))
