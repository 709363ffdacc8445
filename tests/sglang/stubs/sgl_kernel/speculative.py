"""A torch reference of sgl_kernel.speculative.reconstruct_indices_from_tree_mask (a stub for
tests/sglang; the contract is the one SGLang's Triton fallback documents in
sglang/kernels/ops/speculative/reconstruct_tree.py). Per request b, with n nodes and
strict ancestors a[i, j] = mask[b, i, j] and j < i:
positions = depth + seq_len; retrieve_index = b * n + i; parent = the largest ancestor;
next_token = the first child; next_sibling = the next node with the same parent (-1: none)."""

from __future__ import annotations

import torch


def reconstruct_indices_from_tree_mask(
    tree_mask: torch.Tensor,
    verified_seq_len: torch.Tensor,
    positions: torch.Tensor,
    retrieve_index: torch.Tensor,
    retrieve_next_token: torch.Tensor,
    retrieve_next_sibling: torch.Tensor,
    batch_size: int,
    draft_token_num: int,
) -> None:
    n = draft_token_num
    grid = tree_mask.reshape(batch_size, n, n).to(torch.bool)
    order = torch.arange(n)
    ancestors = grid & (order[None, None, :] < order[None, :, None])
    depth = ancestors.sum(-1)
    positions.copy_((depth + verified_seq_len.reshape(-1, 1).to(torch.int64)).reshape(-1))
    retrieve_index.copy_(
        (torch.arange(batch_size)[:, None] * n + order[None, :]).reshape(retrieve_index.shape)
    )
    parent = torch.where(ancestors, order[None, None, :], -1).amax(-1)  # [bs, n]
    next_token = torch.full((batch_size, n), -1, dtype=torch.int64)
    next_sibling = torch.full((batch_size, n), -1, dtype=torch.int64)
    for b in range(batch_size):
        for i in range(n):
            children = (parent[b] == i).nonzero().flatten()
            if children.numel():
                next_token[b, i] = children.min()
            if parent[b, i] >= 0:
                later = ((parent[b] == parent[b, i]) & (order > i)).nonzero().flatten()
                if later.numel():
                    next_sibling[b, i] = later.min()
    retrieve_next_token.copy_(next_token.reshape(retrieve_next_token.shape))
    retrieve_next_sibling.copy_(next_sibling.reshape(retrieve_next_sibling.shape))
