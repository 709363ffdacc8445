"""Our layout through SGLang's own Triton kernels (TRITON_INTERPRET=1, on CPU tensors).

A simulated target model: request b would generate `target[b]` after its root, and after any
other prefix it predicts a token no draft holds. Given our drafts in SGLang's layout, the
tree-rebuild kernel (positions, first child, next sibling) and the greedy tree-verify kernel
must accept exactly the longest draft path that agrees with the target, and emit the
target's tokens along it plus its next one: what NGRAM's verify step commits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sgl_kernel.speculative import reconstruct_indices_from_tree_mask
from sglang.kernels.ops.speculative.reconstruct_tree import (
    reconstruct_indices_from_tree_mask_triton,
)
from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_triton
from sglang.srt.speculative.ngram_worker import _derive_tree_links

from drafter.draft import Draft
from service.sglang_plugin.layout import batch_layout

WIDTH = 8
OFF_PATH = 999  # the target's prediction after a prefix it would not generate


def chain(*tokens: int) -> Draft:
    return Draft(list(tokens), list(range(-1, len(tokens) - 1)))


def path_tokens(draft: Draft, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(draft.token_ids[node])
        node = draft.parents[node]
    return path[::-1]


def expected_accept(draft: Draft, target: list[int]) -> list[int]:
    """The longest draft path that is a prefix of what the target generates."""
    best: list[int] = []
    for node in range(len(draft)):
        path = path_tokens(draft, node)
        if path == target[: len(path)] and len(path) > len(best):
            best = path
    return best


def rebuild(mask: np.ndarray, seq_lens: list[int]) -> tuple[torch.Tensor, ...]:
    bs = len(seq_lens)
    tree_mask = torch.from_numpy(mask).to(torch.bool)
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    out = [torch.empty(bs * WIDTH, dtype=torch.int64)] + [
        torch.empty((bs, WIDTH), dtype=torch.int64) for _ in range(3)
    ]
    reconstruct_indices_from_tree_mask_triton(tree_mask, lens, *out, bs, WIDTH)
    return tuple(out)


def simulated_target(
    tokens: np.ndarray, mask: np.ndarray, targets: list[list[int]]
) -> torch.Tensor:
    """target_predict [bs, WIDTH]: the target's next token after each node's path."""
    bs = len(targets)
    grid = mask.reshape(bs, WIDTH, WIDTH)
    rows = tokens.reshape(bs, WIDTH)
    predict = torch.full((bs, WIDTH), OFF_PATH, dtype=torch.int64)
    for b, target in enumerate(targets):
        for i in range(WIDTH):
            path = [int(rows[b, j]) for j in range(1, WIDTH) if grid[b, i, j] and j <= i]
            if path == target[: len(path)]:
                predict[b, i] = target[len(path)]
    return predict


CASES = [
    # (draft, what the target generates after the root)
    (chain(11, 12, 13, 14), [11, 12, 13, 50, 51]),  # 3 of 4 accepted
    (chain(11, 12, 13), [11, 12, 13, 14]),  # all accepted, then the target's own
    (chain(11, 12), [20, 21]),  # none
    (Draft(), [30, 31]),  # nothing drafted: the target's token only
    # a tree: the target follows the second branch, 13 -> 15 -> 16
    (Draft([12, 13, 14, 15, 16], [-1, -1, 0, 1, 3]), [13, 15, 16, 17]),
    # a tree whose full width is used (7 nodes): the first branch to depth 2
    (Draft([21, 22, 23, 24, 25, 26, 27], [-1, -1, 0, 0, 1, 2, 5]), [21, 23, 40]),
]


@pytest.mark.parametrize("draft,target", CASES)
def test_sglang_kernels_accept_exactly_what_the_target_would_generate(
    draft: Draft, target: list[int]
) -> None:
    root = 5
    tokens, mask = batch_layout([draft], [root], WIDTH)
    positions, retrieve_index, next_token, next_sibling = rebuild(mask, [100])
    depth = mask.reshape(WIDTH, WIDTH).sum(1) - 1
    assert positions.tolist() == (depth + 100).tolist()  # the root sits at seq_len

    predicts = torch.zeros(WIDTH, dtype=torch.int32)
    accept_index = torch.full((1, WIDTH), -1, dtype=torch.int32)
    accept_num = torch.empty(1, dtype=torch.int32)
    target_predict = simulated_target(tokens, mask, [target])
    verify_tree_greedy_triton(
        predicts,
        accept_index,
        accept_num,
        torch.from_numpy(tokens).reshape(1, WIDTH),
        retrieve_index,
        next_token,
        next_sibling,
        target_predict,
    )
    accepted = expected_accept(draft, target)
    assert int(accept_num[0]) == len(accepted)
    nodes = [int(i) for i in accept_index[0] if i >= 0]
    assert [int(tokens[i]) for i in nodes] == [root, *accepted]  # the accepted path
    # What the step commits: the accepted tokens, then the target's next one.
    assert [int(predicts[i]) for i in nodes] == target[: len(accepted) + 1]


def test_a_batch_verifies_per_request() -> None:
    drafts = [draft for draft, _ in CASES]
    targets = [target for _, target in CASES]
    roots = [5] * len(drafts)
    tokens, mask = batch_layout(drafts, roots, WIDTH)
    bs = len(drafts)
    _, retrieve_index, next_token, next_sibling = rebuild(mask, [10 * b for b in range(bs)])
    predicts = torch.zeros(bs * WIDTH, dtype=torch.int32)
    accept_index = torch.full((bs, WIDTH), -1, dtype=torch.int32)
    accept_num = torch.empty(bs, dtype=torch.int32)
    verify_tree_greedy_triton(
        predicts,
        accept_index,
        accept_num,
        torch.from_numpy(tokens).reshape(bs, WIDTH),
        retrieve_index,
        next_token,
        next_sibling,
        simulated_target(tokens, mask, targets),
    )
    assert accept_num.tolist() == [
        len(expected_accept(d, t)) for d, t in zip(drafts, targets, strict=True)
    ]


def test_triton_rebuild_matches_sglangs_host_links_and_the_reference_stub() -> None:
    drafts = [draft for draft, _ in CASES]
    _, mask = batch_layout(drafts, [5] * len(drafts), WIDTH)
    bs = len(drafts)
    triton_out = rebuild(mask, list(range(bs)))
    host_next, host_sibling = _derive_tree_links(mask.astype(bool), bs, WIDTH)
    assert triton_out[2].tolist() == host_next.tolist()
    assert triton_out[3].tolist() == host_sibling.tolist()
    stub_out = [torch.empty_like(t) for t in triton_out]
    reconstruct_indices_from_tree_mask(
        torch.from_numpy(mask).to(torch.bool),
        torch.arange(bs, dtype=torch.int64),
        *stub_out,
        bs,
        WIDTH,
    )
    for ours, theirs in zip(stub_out, triton_out, strict=True):
        assert ours.tolist() == theirs.tolist()
