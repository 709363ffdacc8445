"""layout.py against SGLang's own C++ corpus (JIT-built here): the same drafts, the same layout.

To make SGLang's corpus emit a given draft, each of its root-to-leaf paths is inserted after a
context of its own tokens (ids no draft uses) and the corpus is asked for that context, with
a BFS breadth that never cuts. A chain has one layout; a tree's siblings come out of the C++
in its hash map's order, so trees are compared as trees (root, every node's path of tokens,
ancestor mask, BFS depth order, padding) and chains as arrays.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sglang.srt.speculative.cpp_ngram.ngram_corpus import NgramCorpus

from drafter.draft import Draft
from service.sglang_plugin.layout import batch_layout, bfs_order

CONTEXT = [9001, 9002]  # never a draft token
_ids = itertools.count()


def sglang_layout(drafts: list[Draft], width: int) -> tuple[np.ndarray, np.ndarray]:
    """SGLang's layout of these drafts, one fresh corpus per call."""
    corpus = NgramCorpus(
        max_trie_depth=18,
        min_bfs_breadth=16,
        max_bfs_breadth=16,
        draft_token_num=width,
        match_type="BFS",
        capacity=100_000,
    )
    contexts = []
    for i, draft in enumerate(drafts):
        context = [c + 100 * i for c in CONTEXT]
        contexts.append(context)
        corpus.batch_put([context + path for path in leaf_paths(draft)] or [[context[0]]])
    corpus.synchronize()
    rids = [f"r{next(_ids)}" for _ in drafts]
    return corpus.batch_get(rids, contexts, [len(c) for c in contexts])


def leaf_paths(draft: Draft) -> list[list[int]]:
    has_child = set(draft.parents)
    paths = []
    for leaf in range(len(draft)):
        if leaf in has_child:
            continue
        path, node = [], leaf
        while node >= 0:
            path.append(draft.token_ids[node])
            node = draft.parents[node]
        paths.append(path[::-1])
    return paths


def parents_of(mask: np.ndarray, width: int) -> list[int]:
    """Each node's parent (the closest ancestor), -1 for the root."""
    grid = mask.reshape(width, width)
    return [max((j for j in range(i) if grid[i, j]), default=-1) for i in range(width)]


def check_layout(tokens: np.ndarray, mask: np.ndarray, width: int, nodes: int) -> None:
    """The invariants of SGLang's layout for one request with `nodes` draft tokens."""
    grid = mask.reshape(width, width)
    parents = parents_of(mask, width)
    depth = [0] * width
    for i in range(1, width):
        depth[i] = depth[parents[i]] + 1
        ancestors = set()
        node = i
        while node >= 0:
            ancestors.add(node)
            node = parents[node]
        assert {j for j in range(width) if grid[i, j]} == ancestors  # mask = ancestors + self
    assert grid[0].tolist() == [1] + [0] * (width - 1)
    assert depth[: nodes + 1] == sorted(depth[: nodes + 1])  # breadth-first
    for pad in range(nodes + 1, width):  # padding: token 0 hanging off the root
        assert tokens[pad] == 0
        assert parents[pad] == 0


def as_tree(tokens: np.ndarray, mask: np.ndarray, width: int, nodes: int) -> tuple[int, list]:
    parents = parents_of(mask, width)
    paths = []
    for i in range(1, nodes + 1):
        path, node = [], i
        while node > 0:
            path.append(int(tokens[node]))
            node = parents[node]
        paths.append(tuple(path[::-1]))
    return int(tokens[0]), sorted(paths)


def chain(*tokens: int) -> Draft:
    return Draft(list(tokens), list(range(-1, len(tokens) - 1)))


TREES = [
    # a two-way root, one branch growing: 11 -> (12 -> (14, 15 -> 16)), 13
    Draft([11, 13, 12, 14, 15, 16], [-1, -1, 0, 2, 2, 4]),
    # draft order is best-first, not breadth-first: a deep node listed before a shallow one
    Draft([21, 22, 23, 24], [-1, 0, 1, -1]),
    # three children of one node
    Draft([31, 32, 33, 34], [-1, 0, 0, 0]),
]


@pytest.mark.parametrize("width", [2, 4, 8, 16])
def test_chains_equal_sglang_exactly(width: int) -> None:
    for size in sorted({1, width // 2, width - 1}):
        draft = chain(*range(100, 100 + size))
        ours = batch_layout([draft], [CONTEXT[-1]], width)
        theirs = sglang_layout([draft], width)
        assert ours[0].dtype == theirs[0].dtype == np.int64
        assert ours[1].dtype == theirs[1].dtype == np.int64
        assert ours[0].tolist() == theirs[0].tolist()
        assert ours[1].tolist() == theirs[1].tolist()


@pytest.mark.parametrize("width", [7, 8, 16])  # 7: the first tree fills the width exactly
def test_trees_equal_sglang_as_trees(width: int) -> None:
    for draft in TREES:
        ours = batch_layout([draft], [CONTEXT[-1]], width)
        theirs = sglang_layout([draft], width)
        for tokens, mask in (ours, theirs):
            check_layout(tokens, mask, width, len(draft))
        assert as_tree(*ours, width, len(draft)) == as_tree(*theirs, width, len(draft))


def test_tree_order_is_breadth_first_with_draft_order_among_siblings() -> None:
    draft = TREES[1]
    tokens, _ = batch_layout([draft], [5], 6)
    assert [draft.token_ids[i] for i in bfs_order(draft.parents)] == [21, 24, 22, 23]
    assert tokens.tolist() == [5, 21, 24, 22, 23, 0]


@pytest.mark.parametrize("width", [2, 8])
def test_empty_draft_is_all_padding_as_in_sglang(width: int) -> None:
    ours = batch_layout([Draft()], [CONTEXT[-1]], width)
    theirs = sglang_layout([Draft()], width)  # a context the corpus never saw
    assert ours[0].tolist() == theirs[0].tolist() == [CONTEXT[-1]] + [0] * (width - 1)
    assert ours[1].tolist() == theirs[1].tolist()


def test_a_batch_is_its_requests_side_by_side() -> None:
    width = 8
    drafts = [chain(101, 102, 103), Draft(), chain(*range(200, 207)), TREES[2]]
    roots = [CONTEXT[-1] + 100 * i for i in range(len(drafts))]
    tokens, mask = batch_layout(drafts, roots, width)
    their_tokens, their_mask = sglang_layout(drafts, width)
    assert tokens.shape == their_tokens.shape == (len(drafts) * width,)
    assert mask.shape == their_mask.shape == (len(drafts) * width * width,)
    area = width * width
    for i, draft in enumerate(drafts):
        one = (tokens[i * width : (i + 1) * width], mask[i * area : (i + 1) * area])
        other = (their_tokens[i * width : (i + 1) * width], their_mask[i * area : (i + 1) * area])
        assert as_tree(*one, width, len(draft)) == as_tree(*other, width, len(draft))
        if draft.is_chain():
            assert one[0].tolist() == other[0].tolist()
            assert one[1].tolist() == other[1].tolist()


def test_a_draft_that_does_not_fit_the_width_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        batch_layout([chain(*range(100, 108))], [1], 8)
