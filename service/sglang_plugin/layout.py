"""Our drafts in the layout SGLang's NGRAM verify step takes (sglang 0.5.23).

Per request, D = --speculative-num-draft-tokens nodes: node 0 is the root, the request's last
committed token (its KV is not cached yet, so the verify step runs it too); nodes 1.. are the
draft's tokens in breadth-first order, every parent before its children; the rest is padding,
token 0 hanging off the root. mask[i, j] = 1 when node j is node i's ancestor or i itself.
This is what SGLang's own C++ corpus emits (kernels/jit/csrc/ngram_corpus/result.cpp,
fillResult); tests/sglang compare the two on the same drafts. Both arrays are int64, flat, as
NGRAMWorker._prepare_draft_tokens returns them: tokens [bs * D], mask [bs * D * D].

No sglang or torch import: the converter is plain numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from drafter.draft import Draft

Int64Array = npt.NDArray[np.int64]


def bfs_order(parents: Sequence[int]) -> list[int]:
    """Draft node indices in breadth-first order (siblings keep their draft order); parents[i]
    is -1 for a node that follows the context. ValueError unless every parent comes first."""
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]  # [0]: the root's
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"draft node {i} has parent {parent}: parents must come first")
        children[parent + 1].append(i)
    order: list[int] = []
    frontier = children[0]
    while frontier:
        order += frontier
        frontier = [child for node in frontier for child in children[node + 1]]
    return order


def fill_layout(
    draft: Draft, root_token: int, width: int, tokens: Int64Array, mask: Int64Array
) -> None:
    """Write one request's layout into `tokens` [width] and `mask` [width * width] (views into
    the batch buffers; every element is written). The draft must fit: len(draft) < width."""
    if len(draft) >= width:
        raise ValueError(f"a draft of {len(draft)} tokens does not fit width {width}")
    grid = mask.reshape(width, width)
    grid.fill(0)
    tokens.fill(0)
    tokens[0] = root_token
    grid[:, 0] = 1  # the root is every node's ancestor, padding included
    np.fill_diagonal(grid, 1)
    slot_of = [0] * len(draft)  # draft index -> layout node
    for slot, index in enumerate(bfs_order(draft.parents), start=1):
        slot_of[index] = slot
        tokens[slot] = draft.token_ids[index]
        parent = draft.parents[index]
        if parent >= 0:  # the parent's ancestors, then its own column
            row = slot_of[parent]
            grid[slot, :row] = grid[row, :row]
            grid[slot, row] = 1


def batch_layout(
    drafts: Sequence[Draft], root_tokens: Sequence[int], width: int
) -> tuple[Int64Array, Int64Array]:
    """The flat (tokens [bs * width], mask [bs * width * width]) of a batch's drafts."""
    if len(drafts) != len(root_tokens):
        raise ValueError("need one root token per draft")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    bs = len(drafts)
    tokens = np.empty(bs * width, dtype=np.int64)
    mask = np.empty(bs * width * width, dtype=np.int64)
    area = width * width
    for i, (draft, root) in enumerate(zip(drafts, root_tokens, strict=True)):
        fill_layout(
            draft,
            root,
            width,
            tokens[i * width : (i + 1) * width],
            mask[i * area : (i + 1) * area],
        )
    return tokens, mask
