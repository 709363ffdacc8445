"""The batched draft call equals the per-row calls."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drafter import Draft, DrafterConfig, ReferenceSuffixTree, RolloutHistory, SuffixTree
from drafter.draft import CONTEXT, DRAFT_SOURCES, OTHER_GROUPS
from drafter.history import source_of
from drafter.suffix_tree import batch_row, speculate_batch

tokens_st = st.lists(st.integers(0, 4), min_size=0, max_size=24)


def per_row(
    own: SuffixTree,
    shared: SuffixTree | None,
    siblings: SuffixTree | None,
    fallback: SuffixTree | None,
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
    theirs = Draft() if shared is None else one(shared)
    if not (mine or theirs) and fallback is not None:
        return one(fallback).sourced(OTHER_GROUPS)
    if shared is None:
        return mine.sourced(CONTEXT)
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
            st.booleans(),  # the row's own sequence is also live in its group's trees
            st.integers(0, 3),  # its fallback tree: a group's (maybe its own), 3: none
        ),
        min_size=0,
        max_size=8,
    ),
    budgets=st.lists(st.integers(0, 10), min_size=8, max_size=8),
    max_depth=st.integers(2, 24),  # long matches need max_depth - budget to be large
    context_len=st.integers(0, 26),
    min_prob=st.sampled_from([0.0, 0.1, 0.4]),
    tree=st.booleans(),
    spec_factor=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    own_wins_ties=st.booleans(),
)
def test_batch_equals_per_row_calls(
    shared_seqs: list[list[list[int]]],
    rows: list[tuple[list[int], int, int, bool, int]],
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
    own, shared, siblings, contexts, in_shared, fallbacks = [], [], [], [], [], []
    for row, (sequence, group_index, running, also_shared, fallback) in enumerate(rows):
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
        # As a running request with live siblings: its sequence (ids past the group's) is in
        # the group's trees too, and the batch finds its context's suffixes there by slot.
        seq_id = 100 + row if group is not None and also_shared else -1
        if seq_id >= 0:
            group.extend(seq_id, sequence)
            if live is not None:
                live.extend(seq_id, sequence)
        in_shared.append(seq_id)
        fallbacks.append(groups[fallback] if fallback < len(groups) else None)
    sizes = budgets[: len(rows)]
    got = speculate_batch(
        [batch_row(*row) for row in zip(own, shared, siblings, in_shared, fallbacks, strict=True)],
        sizes,
        context_len,
        min_prob,
        tree,
        spec_factor=spec_factor,
        own_wins_ties=own_wins_ties,
    )
    want = [
        per_row(o, s, b, f, c, m, min_prob, tree, spec_factor, own_wins_ties)
        for o, s, b, f, c, m in zip(own, shared, siblings, fallbacks, contexts, sizes, strict=True)
    ]
    assert got == want
    assert all(draft.source in DRAFT_SOURCES if draft else not draft.source for draft in got)


def test_batch_checks_its_arguments() -> None:
    tree = SuffixTree(8)
    tree.extend(0, [1, 2])
    row = batch_row(tree)
    with pytest.raises(ValueError, match="differ in length"):
        speculate_batch([row], [4, 4], 8)
    with pytest.raises(ValueError, match="max_tokens"):
        speculate_batch([row], [-1], 8)
    with pytest.raises(ValueError, match="min_prob"):
        speculate_batch([row], [4], 8, min_prob=2.0)
    with pytest.raises(ValueError, match="spec_factor"):
        speculate_batch([row], [4], 8, spec_factor=-1.0)
    with pytest.raises(ValueError, match="a tuple"):
        speculate_batch([row[:3]], [4], 8)  # type: ignore[list-item]
    assert speculate_batch([], [], 8) == []
    with pytest.raises(ValueError, match="sequence 0"):
        speculate_batch([batch_row(SuffixTree(8))], [4], 8)
    group = SuffixTree(8)
    group.extend(7, [9, 1, 2])
    group.extend(8, [2, 1])
    with pytest.raises(ValueError, match="shared tree"):
        speculate_batch([batch_row(tree, shared_seq=7)], [4], 8)
    with pytest.raises(ValueError, match="live"):
        speculate_batch([batch_row(tree, group, shared_seq=5)], [4], 8)
    with pytest.raises(ValueError, match="live"):
        speculate_batch([batch_row(tree, group, SuffixTree(8), 7)], [4], 8)
    with pytest.raises(ValueError, match="end with the row's context"):
        speculate_batch([batch_row(tree, group, shared_seq=8)], [4], 8)
    by_slot = speculate_batch([batch_row(tree, group, shared_seq=7)], [4], 8)
    assert by_slot == speculate_batch([batch_row(tree, group)], [4], 8)


request_st = st.tuples(st.sampled_from(["a", "b"]), tokens_st.filter(bool), tokens_st)


@settings(max_examples=100, deadline=None)
@given(
    rollouts=st.lists(request_st, max_size=5),
    live=st.lists(request_st, min_size=1, max_size=5),
    budgets=st.lists(st.integers(0, 12), min_size=5, max_size=5),
    live_siblings=st.booleans(),
    tree_drafts=st.booleans(),
    other_groups=st.booleans(),
)
def test_history_batch_equals_its_per_row_speculate(
    rollouts: list[tuple[str, list[int], list[int]]],
    live: list[tuple[str, list[int], list[int]]],
    budgets: list[int],
    live_siblings: bool,
    tree_drafts: bool,
    other_groups: bool,
) -> None:
    config = DrafterConfig(
        max_depth=10,
        live_siblings=live_siblings,
        tree_drafts=tree_drafts,
        other_groups=other_groups,
    )
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
