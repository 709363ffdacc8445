"""The batched extend (every row of a verify step in one native call) equals extending the rows
one by one: in the suffix trees, the rollout history, suffix decoding's cache and the
speculation core."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter import DrafterConfig, ReferenceSuffixTree, RolloutHistory, SuffixTree
from drafter.cost import CostModel
from drafter.history import TokenTree
from drafter.policy import FixedPolicy
from drafter.speculator import Speculator
from drafter.suffix_decoding import SuffixDecodingCache, SuffixDecodingConfig
from drafter.suffix_tree import extend_batch, extend_row

VOCAB = 4
# Every n-gram of up to 3 tokens over the vocabulary: two trees with equal counts of all of
# them (and equal token and node counts) store the same sequences' suffixes.
NGRAMS = [list(g) for n in (1, 2, 3) for g in itertools.product(range(VOCAB), repeat=n)]


def fingerprint(tree: SuffixTree) -> tuple[object, ...]:
    tree.check_integrity()
    contexts = ([], [0], [1, 2], [3, 3, 0])
    drafts = tuple(tree.speculate(c, 6, 0.0, True) for c in contexts)
    counts = tuple(tree.count(g) for g in NGRAMS)
    return tree.num_tokens(), tree.num_nodes(), counts, drafts


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=1, max_size=3),
            st.lists(st.integers(0, VOCAB - 1), max_size=6),
        ),
        max_size=10,
    ),
    steps=st.integers(1, 3),
    max_depth=st.integers(2, 8),
    threads=st.sampled_from([0, 1, 2, 3]),
)
def test_extend_batch_equals_extending_one_by_one(
    rows: list[tuple[list[tuple[int, int]], list[int]]], steps: int, max_depth: int, threads: int
) -> None:
    """On any number of threads (0: automatic, one thread for so few tokens; 2 and 3 spread
    the three trees over threads however few tokens they get)."""
    batched = [SuffixTree(max_depth) for _ in range(3)]
    single = [SuffixTree(max_depth) for _ in range(3)]
    for tree in (*batched, *single):  # some sequences exist before, some start in the batch
        tree.extend(0, [1, 2, 3])
    for _ in range(steps):
        extend_batch(
            [extend_row(*((batched[t], seq) for t, seq in targets)) for targets, _ in rows],
            [tokens for _, tokens in rows],
            threads,
        )
        for targets, tokens in rows:
            for t, seq in targets:
                if tokens:  # an empty row starts no sequence
                    single[t].extend(seq, tokens)
    for a, b in zip(batched, single, strict=True):
        assert fingerprint(a) == fingerprint(b)
        assert len(a) == len(b)


@pytest.mark.parametrize("threads", [0, 2, 5])
def test_a_big_step_grows_its_trees_on_threads_as_on_one(threads: int) -> None:
    """Past 256 appended tokens, threads = 0 spreads the trees over this machine's CPUs too:
    48 rows, each into its own tree and one of 4 shared ones, 8 tokens a row a step."""
    rng = np.random.default_rng(7)
    steps = [rng.integers(0, VOCAB, size=(48, 8)).tolist() for _ in range(3)]
    grown = []
    for run_threads in (1, threads):
        own = [SuffixTree(16) for _ in range(48)]
        shared = [SuffixTree(16) for _ in range(4)]
        rows = [extend_row((own[i], 0), (shared[i % 4], i)) for i in range(48)]
        for step in steps:
            extend_batch(rows, step, run_threads)
        grown.append([fingerprint(tree) for tree in (*own, *shared)])
    assert grown[0] == grown[1]


def test_extend_batch_checks_everything_before_it_changes_a_tree() -> None:
    tree = SuffixTree(8)
    row = extend_row((tree, 0))
    before = fingerprint(tree)
    for bad in ([1.5], [True], ["7"], [2**31], [-(2**31) - 1]):
        with pytest.raises(ValueError):
            extend_batch([row, row], [[1, 2], bad])  # type: ignore[list-item]
        assert fingerprint(tree) == before  # the first row was not applied either
    with pytest.raises(ValueError, match="differ in length"):
        extend_batch([row], [[1], [2]])
    with pytest.raises(ValueError, match="a tuple"):
        extend_batch([(tree._core,)], [[1]])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        extend_row((tree, -1))
    with pytest.raises(ValueError):
        extend_row()
    with pytest.raises(ValueError, match="threads"):
        extend_batch([row], [[1]], -1)
    with pytest.raises(ValueError, match="extend_threads"):
        DrafterConfig(extend_threads=-1)
    assert fingerprint(tree) == before
    extend_batch([row], [np.array([3, 4], dtype=np.int64)])  # numpy's integers are ints
    assert tree.count([3, 4]) == 1
    extend_batch([], [])


def _histories(live_siblings: bool, threads: int = 0) -> list[RolloutHistory]:
    """A native history and one of the Python reference trees (the per-row fallback)."""
    config = DrafterConfig(max_depth=8, live_siblings=live_siblings, extend_threads=threads)
    factories: list[Callable[[int], TokenTree]] = [SuffixTree, ReferenceSuffixTree]
    return [RolloutHistory(config, factory) for factory in factories]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=4), min_size=4, max_size=4),
        min_size=1,
        max_size=6,
    ),
    live_siblings=st.booleans(),
    threads=st.sampled_from([0, 1, 2]),
)
def test_the_history_drafts_alike_after_batched_and_single_extends(
    steps: list[list[list[int]]], live_siblings: bool, threads: int
) -> None:
    for history in _histories(live_siblings, threads):
        twin = RolloutHistory(history.config, tree_factory=history._new_tree)
        ids = ["a", "b", "c", "d"]
        for h in (history, twin):
            h.add_rollout("g", [1, 2, 3, 0, 1, 2], 0, [3])
            for i, request_id in enumerate(ids):
                h.start_request(request_id, "g" if i < 3 else "other", [3, i % VOCAB])
        for step in steps:
            history.extend_batch(ids, step)
            for request_id, tokens in zip(ids, step, strict=True):
                twin.extend_request(request_id, tokens)
            assert history.speculate_batch(ids, [4] * 4) == twin.speculate_batch(ids, [4] * 4)
        with pytest.raises(KeyError):
            history.extend_batch(["a", "nobody"], [[1], [2]])
        with pytest.raises(ValueError):
            history.extend_batch(ids, [[1]])


@pytest.mark.parametrize("factory", [SuffixTree, ReferenceSuffixTree], ids=["native", "reference"])
def test_suffix_cache_extends_alike_even_after_an_eviction(
    factory: Callable[[int], TokenTree],
) -> None:
    config = SuffixDecodingConfig(max_depth=8, max_cached_requests=2, min_prob=0.0)
    batched = SuffixDecodingCache(config, tree_factory=factory)  # type: ignore[arg-type]
    single = SuffixDecodingCache(config, tree_factory=factory)  # type: ignore[arg-type]
    rng = np.random.default_rng(3)
    for cache in (batched, single):
        cache.start_request("a", "g", [1, 2])
        cache.start_request("b", "g", [2, 1])
    for step in range(6):
        if step == 3:  # a third request evicts a's response while a still runs
            for cache in (batched, single):
                cache.start_request("c", "g", [3])
        ids = ["a", "b"] if step < 3 else ["a", "b", "c"]
        tokens = [rng.integers(0, VOCAB, int(rng.integers(0, 3))).tolist() for _ in ids]
        batched.extend_batch(ids, tokens)
        for request_id, row in zip(ids, tokens, strict=True):
            single.extend_request(request_id, row)
        assert batched.speculate_batch(ids, [4] * len(ids)) == single.speculate_batch(
            ids, [4] * len(ids)
        )
    assert batched.num_tokens() == single.num_tokens()


def test_the_speculation_core_counts_alike_batched_and_single() -> None:
    cores = [
        Speculator(RolloutHistory(DrafterConfig(max_depth=8)), FixedPolicy(4), max_draft=4)
        for _ in range(2)
    ]
    for core in cores:
        core.history.add_rollout("g", [5, 6, 7, 8, 5, 6, 7, 8], 0, [1])
    batched, single = ([core.start(f"r{i}", "g", [1]) for i in range(3)] for core in cores)
    for step in range(4):
        tokens = [[5, 6, 7][: 1 + (i + step) % 3] for i in range(3)]
        drafted = [3, 0, 2]
        accepted = [min(len(t) - 1, d) for t, d in zip(tokens, drafted, strict=True)]
        cores[0].extend_batch(batched, tokens, drafted, accepted)
        for request, t, d, a in zip(single, tokens, drafted, accepted, strict=True):
            cores[1].extend(request, t, d, a)
    for a, b in zip(batched, single, strict=True):
        assert a.output == b.output and a.view == b.view and a.counters == b.counters
    assert cores[0].drafts(batched, [4] * 3) == cores[1].drafts(single, [4] * 3)
    with pytest.raises(ValueError, match="accepted"):
        cores[0].extend_batch(batched[:1], [[5]], [1], [2])
    with pytest.raises(ValueError, match="per request"):
        cores[0].extend_batch(batched, [[5]], [0], [0])


@settings(max_examples=200, deadline=None)
@given(
    increments=st.lists(st.floats(0.0, 0.02), max_size=8),
    c_tok=st.floats(1e-5, 0.01),
    live=st.integers(0, 12),
)
def test_draft_costs_equal_draft_cost(increments: list[float], c_tok: float, live: int) -> None:
    steps = tuple(itertools.accumulate([0.03, *increments])) if increments else ()
    cost = CostModel(0.03, c_tok, steps)
    drafted = np.arange(0, 20)
    want = [cost.draft_cost(live, int(d)) for d in drafted]
    assert cost.draft_costs(live, drafted).tolist() == want  # the same floats
