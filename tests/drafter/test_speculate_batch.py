"""The batched draft call equals the per-row calls."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter import Draft, DrafterConfig, ReferenceSuffixTree, RolloutHistory, SuffixTree
from drafter.draft import CONTEXT, DRAFT_SOURCES
from drafter.history import source_of
from drafter.suffix_tree import speculate_batch

tokens_st = st.lists(st.integers(0, 4), min_size=0, max_size=24)


def per_row(
    own: SuffixTree,
    shared: SuffixTree | None,
    siblings: SuffixTree | None,
    context: list[int],
    max_tokens: int,
    min_prob: float,
    tree: bool,
    spec_factor: float,
    own_wins_ties: bool,
) -> Draft:
    """What the batch must give for one row, from the per-row calls, with its source."""
    if max_tokens == 0:
        return Draft()

    def one(t: SuffixTree) -> Draft:
        if spec_factor > 0:
            return t.speculate_capped(context, max_tokens, min_prob, tree, spec_factor)
        return t.speculate(context, max_tokens, min_prob, tree)

    mine = one(own)
    if shared is None:
        return mine.sourced(CONTEXT)
    theirs = one(shared)
    wins = theirs.score > mine.score if own_wins_ties else theirs.score >= mine.score
    if not wins:
        return mine.sourced(CONTEXT)
    if not theirs:
        return theirs
    return theirs.sourced(source_of(theirs, context, own, shared, siblings))


@settings(max_examples=300, deadline=None)
@given(
    shared_seqs=st.lists(st.lists(tokens_st, max_size=4), min_size=1, max_size=3),
    rows=st.lists(
        st.tuples(
            st.lists(st.integers(0, 4), min_size=1, max_size=30),
            st.integers(0, 2),
            st.integers(-1, 4),  # the group's first k sequences are running; -1: none tracked
        ),
        min_size=0,
        max_size=8,
    ),
    budgets=st.lists(st.integers(0, 10), min_size=8, max_size=8),
    max_depth=st.integers(2, 12),
    context_len=st.integers(0, 14),
    min_prob=st.sampled_from([0.0, 0.1, 0.4]),
    tree=st.booleans(),
    spec_factor=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    own_wins_ties=st.booleans(),
)
def test_batch_equals_per_row_calls(
    shared_seqs: list[list[list[int]]],
    rows: list[tuple[list[int], int, int]],
    budgets: list[int],
    max_depth: int,
    context_len: int,
    min_prob: float,
    tree: bool,
    spec_factor: float,
    own_wins_ties: bool,
) -> None:
    groups = []
    for sequences in shared_seqs:
        group = SuffixTree(max_depth)
        for seq_id, seq in enumerate(sequences):
            if seq:
                group.extend(seq_id, seq)
        groups.append(group)
    own, shared, siblings, contexts = [], [], [], []
    for sequence, group_index, running in rows:
        tree_of_row = SuffixTree(max_depth)
        tree_of_row.extend(0, sequence)
        own.append(tree_of_row)
        group = groups[group_index] if group_index < len(groups) else None
        shared.append(group)
        live = None
        if group is not None and running >= 0:  # a tree of some of the group's sequences
            live = SuffixTree(max_depth)
            for seq_id, seq in enumerate(shared_seqs[group_index][:running]):
                if seq:
                    live.extend(seq_id, seq)
        siblings.append(live)
        contexts.append(sequence[-context_len:] if context_len else [])
    sizes = budgets[: len(rows)]
    got = speculate_batch(
        own,
        shared,
        sizes,
        context_len,
        min_prob,
        tree,
        siblings=siblings,
        spec_factor=spec_factor,
        own_wins_ties=own_wins_ties,
    )
    want = [
        per_row(o, s, b, c, m, min_prob, tree, spec_factor, own_wins_ties)
        for o, s, b, c, m in zip(own, shared, siblings, contexts, sizes, strict=True)
    ]
    assert got == want
    assert all(draft.source in DRAFT_SOURCES if draft else not draft.source for draft in got)


def test_batch_checks_its_arguments() -> None:
    tree = SuffixTree(8)
    tree.extend(0, [1, 2])
    with pytest.raises(ValueError, match="one entry per row"):
        speculate_batch([tree], [None, None], [4], 8)
    with pytest.raises(ValueError, match="one entry per row"):
        speculate_batch([tree], [None], [4], 8, siblings=[None, None])
    with pytest.raises(ValueError, match="max_tokens"):
        speculate_batch([tree], [None], [-1], 8)
    with pytest.raises(ValueError, match="min_prob"):
        speculate_batch([tree], [None], [4], 8, min_prob=2.0)
    with pytest.raises(ValueError, match="spec_factor"):
        speculate_batch([tree], [None], [4], 8, spec_factor=-1.0)
    assert speculate_batch([], [], [], 8) == []


request_st = st.tuples(st.sampled_from(["a", "b"]), tokens_st.filter(bool), tokens_st)


@settings(max_examples=100, deadline=None)
@given(
    rollouts=st.lists(request_st, max_size=5),
    live=st.lists(request_st, min_size=1, max_size=5),
    budgets=st.lists(st.integers(0, 12), min_size=5, max_size=5),
    live_siblings=st.booleans(),
    tree_drafts=st.booleans(),
)
def test_history_batch_equals_its_per_row_speculate(
    rollouts: list[tuple[str, list[int], list[int]]],
    live: list[tuple[str, list[int], list[int]]],
    budgets: list[int],
    live_siblings: bool,
    tree_drafts: bool,
) -> None:
    config = DrafterConfig(max_depth=10, live_siblings=live_siblings, tree_drafts=tree_drafts)
    native = RolloutHistory(config)
    reference = RolloutHistory(config, tree_factory=ReferenceSuffixTree)
    for history in (native, reference):
        for group, prompt, output in rollouts:
            history.add_rollout(group, output, 0, prompt)
        for index, (group, prompt, output) in enumerate(live):
            history.start_request(index, group, prompt)
            history.extend_request(index, output)
    ids = list(range(len(live)))
    sizes = budgets[: len(live)]
    batched = native.speculate_batch(ids, sizes)
    assert batched == [native.speculate(i, m) for i, m in zip(ids, sizes, strict=True)]
    # The reference trees take the per-row path and draft the same tokens.
    fallback = reference.speculate_batch(ids, sizes)
    assert [d.token_ids for d in fallback] == [d.token_ids for d in batched]
    assert [d.match_len for d in fallback] == [d.match_len for d in batched]
    assert [d.source for d in fallback] == [d.source for d in batched]
