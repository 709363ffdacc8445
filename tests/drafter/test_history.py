from __future__ import annotations

from collections.abc import Callable

import pytest

from drafter import DrafterConfig, ReferenceSuffixTree, RolloutHistory, SuffixTree
from drafter.history import TokenTree

PROMPT = [101, 102, 103, 104]
ANSWER = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]


@pytest.fixture(params=[SuffixTree, ReferenceSuffixTree], ids=["native", "reference"])
def tree_factory(request: pytest.FixtureRequest) -> Callable[[int], TokenTree]:
    factory: Callable[[int], TokenTree] = request.param
    return factory


def make_history(factory: Callable[[int], TokenTree], **knobs: object) -> RolloutHistory:
    return RolloutHistory(DrafterConfig(**knobs), tree_factory=factory)  # type: ignore[arg-type]


def test_history_drafts_a_rollout_of_the_same_group_from_the_first_token(
    tree_factory: Callable[[int], TokenTree],
) -> None:
    history = make_history(tree_factory)
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)
    history.start_request("r", "g", PROMPT)
    draft = history.speculate("r", 6)
    assert draft.token_ids == ANSWER[:6]
    assert draft.probs == [1.0] * 6
    history.extend_request("r", ANSWER[:6])
    assert history.speculate("r", 16).token_ids == ANSWER[6:]


def test_groups_do_not_share_history(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory)
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)
    history.start_request("other", "h", PROMPT)
    assert len(history.speculate("other", 8)) == 0


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
    history = make_history(tree_factory, max_rollouts_per_group=3)
    for length in range(1, 6):
        history.add_rollout("g", list(range(length)), version=0)
    assert history.recent_lengths("g") == [3, 4, 5]
    assert history.num_tokens() == 3 + 4 + 5


def test_memory_stays_bounded_by_the_window(tree_factory: Callable[[int], TokenTree]) -> None:
    history = make_history(tree_factory, window=2)
    tokens_per_version = []
    for version in range(8):
        history.set_version(version)
        for sample in range(4):
            history.add_rollout("g", [version % 5, sample, *range(20)], version=version)
        tokens_per_version.append(history.num_tokens())
    # From version 1 on the history holds exactly two versions of 4 rollouts of 22 tokens.
    assert tokens_per_version[0] == 4 * 22
    assert tokens_per_version[1:] == [2 * 4 * 22] * 7
    assert history.memory_bytes() > 0


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
    [{"max_depth": 1}, {"window": 0}, {"max_rollouts_per_group": 0}, {"min_prob": 1.5}],
)
def test_config_rejects_bad_values(knobs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DrafterConfig(**knobs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    config = DrafterConfig()
    assert (config.max_depth, config.window, config.max_rollouts_per_group) == (64, 4, 64)
    assert (config.min_prob, config.tree_drafts) == (0.1, False)
    assert RolloutHistory().config == config
