"""The suffix policy (suffix decoding as vLLM configures it) against a brute-force reference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter import Draft, ReferenceSuffixTree, RolloutHistory, SuffixTree
from drafter.policy import RequestView
from drafter.policy_spec import parse_policy, parse_policy_spec
from drafter.speculator import Speculator
from drafter.suffix_decoding import (
    CappedTree,
    SuffixDecodingCache,
    SuffixDecodingConfig,
    SuffixPolicy,
)

# -- brute force ----------------------------------------------------------------------------


def occurrences(sequences: Sequence[Sequence[int]], pattern: Sequence[int]) -> int:
    """How often pattern occurs in the sequences, counted by scanning every position."""
    n = len(pattern)
    return sum(
        1 for seq in sequences for i in range(len(seq) - n + 1) if list(seq[i : i + n]) == pattern
    )


def brute_chain(
    sequences: Sequence[Sequence[int]],
    pattern: list[int],
    budget: int,
    min_prob: float,
    max_depth: int,
) -> tuple[list[int], list[float]]:
    """The most frequent continuation of pattern (ties: the smallest token), token by token,
    while the path probability (count ratio) stays >= min_prob and the string fits max_depth."""
    tokens: list[int] = []
    probs: list[float] = []
    prob = 1.0
    string = list(pattern)
    while len(tokens) < budget and len(string) < max_depth:
        total = occurrences(sequences, string)
        vocabulary = sorted({t for seq in sequences for t in seq})
        counts = [(occurrences(sequences, [*string, t]), t) for t in vocabulary]
        best_count, best_token = max(counts, key=lambda item: (item[0], -item[1]))
        if best_count == 0:
            break
        prob *= best_count / total
        if prob < min_prob:
            break
        tokens.append(best_token)
        probs.append(prob)
        string.append(best_token)
    return tokens, probs


def brute_capped(
    sequences: Sequence[Sequence[int]],
    context: Sequence[int],
    max_tokens: int,
    min_prob: float,
    max_depth: int,
    spec_factor: float,
    spec_offset: float = 0.0,
) -> Draft:
    """Suffix decoding's draft from one tree, straight from its description: every context
    suffix of length m that occurs drafts at most min(max_tokens, floor(factor * m + offset))
    tokens; the best score wins, the longer match on a tie."""
    best: Draft | None = None
    for m in range(1, min(len(context), max_depth - 1) + 1):
        pattern = list(context[-m:])
        if occurrences(sequences, pattern) == 0:
            break
        budget = min(max_tokens, max(0, math.floor(spec_factor * m + spec_offset + 1e-9)))
        tokens, probs = brute_chain(sequences, pattern, budget, min_prob, max_depth)
        score = sum(probs)
        if best is None or score >= best.score:
            best = Draft(tokens, list(range(-1, len(tokens) - 1)), probs, score, m)
    return best if best is not None and best.token_ids else Draft()


def contains_run(sequences: Sequence[Sequence[int]], run: Sequence[int]) -> bool:
    return occurrences(sequences, list(run)) > 0


# -- strategies -----------------------------------------------------------------------------

tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=14)


@pytest.fixture(params=[SuffixTree, ReferenceSuffixTree], ids=["native", "reference"])
def tree_factory(request: pytest.FixtureRequest) -> Callable[[int], CappedTree]:
    factory: Callable[[int], CappedTree] = request.param
    return factory


@settings(max_examples=300, deadline=None)
@given(
    sequences=st.lists(tokens_st, min_size=1, max_size=5),
    context=tokens_st,
    max_tokens=st.integers(0, 8),
    min_prob=st.sampled_from([0.0, 0.1, 0.3]),
    max_depth=st.integers(2, 9),
    spec_factor=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_capped_draft_equals_brute_force(
    sequences: list[list[int]],
    context: list[int],
    max_tokens: int,
    min_prob: float,
    max_depth: int,
    spec_factor: float,
) -> None:
    want = brute_capped(sequences, context, max_tokens, min_prob, max_depth, spec_factor)
    for factory in (SuffixTree, ReferenceSuffixTree):
        tree = factory(max_depth)
        for seq_id, seq in enumerate(sequences):
            tree.extend(seq_id, seq)
        got = tree.speculate_capped(context, max_tokens, min_prob, False, spec_factor)
        assert got.token_ids == want.token_ids
        assert got.probs == pytest.approx(want.probs)
        assert got.score == pytest.approx(want.score)
        assert got.match_len == want.match_len


@settings(max_examples=150, deadline=None)
@given(
    sequences=st.lists(tokens_st, min_size=1, max_size=5),
    context=tokens_st,
    max_tokens=st.integers(1, 8),
    max_depth=st.integers(3, 9),
)
def test_capped_tree_drafts_match_between_native_and_reference(
    sequences: list[list[int]], context: list[int], max_tokens: int, max_depth: int
) -> None:
    native, reference = SuffixTree(max_depth), ReferenceSuffixTree(max_depth)
    for seq_id, seq in enumerate(sequences):
        native.extend(seq_id, seq)
        reference.extend(seq_id, seq)
    got = native.speculate_capped(context, max_tokens, 0.05, True, 1.0)
    want = reference.speculate_capped(context, max_tokens, 0.05, True, 1.0)
    assert (got.token_ids, got.parents, got.match_len) == (
        want.token_ids,
        want.parents,
        want.match_len,
    )
    assert got.probs == pytest.approx(want.probs)
    assert len(got) <= min(max_tokens, got.match_len)


def test_a_shorter_match_with_a_better_draft_wins(
    tree_factory: Callable[[int], CappedTree],
) -> None:
    tree = tree_factory(24)
    tree.extend(0, [1, 2, 3, 9])
    for seq_id in range(1, 6):
        tree.extend(seq_id, [2, 3, 7, 7, 7, 7])
    # [1, 2, 3] drafts [9] (score 1); [2, 3] drafts two of 7 (5/6 each, score 5/3).
    draft = tree.speculate_capped([50, 1, 2, 3], 16)
    assert draft.token_ids == [7, 7]
    assert draft.match_len == 2
    assert draft.score == pytest.approx(5 / 3)
    # The longest match alone (speculate) drafts [9].
    assert tree.speculate([50, 1, 2, 3], 16).token_ids == [9]


def test_capped_checks_its_arguments() -> None:
    tree = SuffixTree(8)
    with pytest.raises(ValueError, match="spec_factor"):
        tree.speculate_capped([1], 4, spec_factor=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        tree.speculate_capped([1], -1)


# -- the cache ------------------------------------------------------------------------------

request_st = st.tuples(
    st.sampled_from(["a", "b", "c"]),  # group
    tokens_st,  # prompt
    tokens_st,  # output, appended in chunks
)


@settings(max_examples=120, deadline=None)
@given(
    requests=st.lists(request_st, min_size=1, max_size=6),
    chunk=st.integers(1, 4),
    max_cached=st.integers(1, 6),
)
def test_cache_drafts_only_what_the_global_cache_or_own_context_holds(
    requests: list[tuple[str, list[int], list[int]]], chunk: int, max_cached: int
) -> None:
    """Requests run interleaved (each appends `chunk` tokens per round); before every round
    each live request's draft equals the brute-force rule over its visible sequences: every
    cached response so far (prompts never) and its own prompt and output."""
    config = SuffixDecodingConfig(max_depth=8, max_spec_tokens=5, max_cached_requests=max_cached)
    caches = [
        SuffixDecodingCache(config, SuffixTree),
        SuffixDecodingCache(config, ReferenceSuffixTree),
    ]
    responses: dict[int, list[int]] = {}  # request index -> its output so far, oldest first
    own: dict[int, list[int]] = {}
    for index, (group, prompt, _) in enumerate(requests):
        for cache in caches:
            cache.start_request(index, group, prompt)
        responses[index] = []
        own[index] = list(prompt)
        while len(responses) > max_cached:
            del responses[next(iter(responses))]
    position = dict.fromkeys(range(len(requests)), 0)
    live = list(range(len(requests)))
    while live:
        ids = list(live)
        budgets = [config.max_spec_tokens] * len(ids)
        batches = [cache.speculate_batch(ids, budgets) for cache in caches]
        for row, index in enumerate(ids):
            context = own[index][-config.max_depth :]
            local = brute_capped([own[index]], context, 5, 0.1, 8, 1.0)
            shared = brute_capped(list(responses.values()), context, 5, 0.1, 8, 1.0)
            want = shared if shared.score > local.score else local
            for cache, batch in zip(caches, batches, strict=True):
                for got in (batch[row], cache.speculate(index, 5)):
                    assert got.token_ids == want.token_ids
                    assert got.score == pytest.approx(want.score)
            draft = batches[0][row]
            if draft.token_ids:
                assert len(draft) <= min(5, math.floor(1.0 * draft.match_len))
                assert min(draft.probs) >= 0.1
                run = [*context[-draft.match_len :], *draft.token_ids]
                assert contains_run([*responses.values(), own[index]], run)
        for index in ids:
            output = requests[index][2]
            piece = output[position[index] : position[index] + chunk]
            position[index] += len(piece)
            for cache in caches:
                cache.extend_request(index, piece)
            own[index] += piece
            if index in responses:
                responses[index] += piece
            if position[index] == len(output):
                for cache in caches:
                    cache.stop_request(index)
                live.remove(index)
    assert all(cache.active_requests() == 0 for cache in caches)


def test_the_cache_is_global_live_and_keeps_responses(
    tree_factory: Callable[[int], CappedTree],
) -> None:
    cache = SuffixDecodingCache(SuffixDecodingConfig(), tree_factory)
    cache.start_request("a", "group-a", [1, 2, 3])
    cache.extend_request("a", [10, 11, 12, 13, 14, 15])
    # Another group's request sees a's output while a still runs...
    cache.start_request("b", "group-b", [9, 9, 10, 11])
    assert cache.speculate("b", 16).token_ids == [12, 13]  # capped at the 2-token match
    cache.stop_request("a")
    # ...and after it ended.
    cache.extend_request("b", [12, 13, 14])
    assert cache.speculate("b", 16).token_ids == [15]
    # Prompts never enter the cache.
    cache.start_request("c", "group-c", [50, 1, 2])
    assert cache.speculate("c", 16).token_ids == []


def test_the_oldest_response_is_evicted_first(tree_factory: Callable[[int], CappedTree]) -> None:
    cache = SuffixDecodingCache(SuffixDecodingConfig(max_cached_requests=2), tree_factory)
    for name, output in (("x", [20, 21, 22, 23]), ("y", [30, 31, 32, 33])):
        cache.start_request(name, "g", [1])
        cache.extend_request(name, output)
        cache.stop_request(name)
    cache.start_request("z", "g", [20, 21, 30, 31])  # evicts x's response
    assert cache.cached_responses() == 2
    assert cache.speculate("z", 16).token_ids == [32, 33]
    cache.extend_request("z", [5, 20, 21])
    assert cache.speculate("z", 16).token_ids == [30, 31]  # from its own prompt, not x


def test_a_request_id_used_again_replaces_its_cached_response(
    tree_factory: Callable[[int], CappedTree],
) -> None:
    cache = SuffixDecodingCache(SuffixDecodingConfig(), tree_factory)
    cache.start_request("r", "g", [1])
    cache.stop_request("r")  # no token: nothing was stored
    cache.start_request("r", "g", [1])
    cache.extend_request("r", [60, 61, 62])
    cache.stop_request("r")
    cache.start_request("r", "g", [2])  # the old response leaves the cache
    assert cache.cached_responses() == 1
    cache.start_request("q", "g", [60, 61])
    assert cache.speculate("q", 16).token_ids == []


def test_cache_rejects_a_request_already_active() -> None:
    cache = SuffixDecodingCache()
    cache.start_request("r", "g", [1, 2])
    with pytest.raises(ValueError, match="already active"):
        cache.start_request("r", "g", [1, 2])


def test_config_checks_itself() -> None:
    SuffixDecodingConfig()
    for bad in (
        {"max_spec_tokens": 0},
        {"spec_factor": 0.0},
        {"spec_factor": math.inf},
        {"spec_offset": math.nan},
        {"min_prob": 1.5},
        {"max_cached_requests": 0},
        {"max_depth": 1},
    ):
        with pytest.raises(ValueError):
            SuffixDecodingConfig(**bad)  # type: ignore[arg-type]


# -- the policy -----------------------------------------------------------------------------


def test_suffix_is_a_policy_name() -> None:
    assert str(parse_policy_spec(" suffix ")) == "suffix"
    policy = parse_policy("suffix")
    assert isinstance(policy, SuffixPolicy)
    assert policy.name == "suffix" and policy.drafts and policy.cost is None
    assert not policy.predicts_lengths
    views = [RequestView("g"), RequestView("h", 40)]
    assert policy.budgets(views) == [16, 16]
    assert policy.config == SuffixDecodingConfig(
        max_depth=24, max_spec_tokens=16, spec_factor=1.0, min_prob=0.1
    )
    with pytest.raises(ValueError):
        policy.observe_step("g", 2, 3)
    with pytest.raises(ValueError):
        policy.observe_finished("g", -1)


def test_speculator_drafts_from_the_suffix_cache_across_groups() -> None:
    history = RolloutHistory()
    policy = SuffixPolicy()
    speculator = Speculator(history, policy)
    first = speculator.start("r1", "group-1", [1, 2, 3])
    speculator.extend(first, [40, 41, 42, 43, 44], 0, 0)
    # A request of another group drafts from the running one's output.
    second = speculator.start("r2", "group-2", [7, 40, 41, 42])
    drafts = speculator.drafts([first, second], [16, 16])
    assert drafts[1].token_ids == [43, 44]
    assert speculator.finish(first, natural=True) is not None
    # The finished rollout joined the history too (its stats and publisher), as for any policy.
    assert history.recent_lengths("group-1") == [5]
