"""vLLM issue 55005: on CPU, the rejection sampler's per-token temperature and top_p come
from a C++ kernel that writes into a temporary int64 copy, so they are never set. The test of
vLLM's own function documents the bug (when it fails, upstream fixed it and the fix can go);
the plugin test fails without our fix."""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from service.vllm_backend import sampler_fix

TEMPERATURE = torch.tensor([0.7, 1.3, 0.5], dtype=torch.float32)
CU_TOKENS = torch.tensor([2, 5, 6], dtype=torch.int32)
EXPECTED = torch.tensor([0.7, 0.7, 1.3, 1.3, 1.3, 0.5])


def test_our_expand() -> None:
    out = sampler_fix.expand_batch_to_tokens(TEMPERATURE, CU_TOKENS, 6)
    assert torch.equal(out, EXPECTED)
    replaced = sampler_fix.expand_batch_to_tokens(
        torch.tensor([-1.0, 2.0]), torch.tensor([1, 3]), 3, replace_from=-1, replace_to=1
    )
    assert replaced.tolist() == [1.0, 2.0, 2.0]
    top_k = sampler_fix.expand_batch_to_tokens(torch.tensor([5, 0]), torch.tensor([2, 3]), 3)
    assert top_k.dtype == torch.int64 and top_k.tolist() == [5, 5, 0]


@pytest.fixture(scope="module")
def cpu_kernels() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the bug is in vLLM's CPU kernels")
    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()


def test_vllm_cpu_expand_leaves_float_values_unset(cpu_kernels: None) -> None:
    module = importlib.import_module("vllm.v1.sample.rejection_sampler")
    original = module.__dict__.get("_das_original", module.expand_batch_to_tokens)
    assert original is not sampler_fix.expand_batch_to_tokens
    x = TEMPERATURE.clone()
    out = original(x, CU_TOKENS, 6)
    assert not torch.equal(out, EXPECTED), "vLLM fixed issue 55005: drop sampler_fix"


def test_the_plugin_installs_the_fix(cpu_kernels: None, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("vllm.v1.sample.rejection_sampler")
    monkeypatch.setattr(module, "expand_batch_to_tokens", module.expand_batch_to_tokens)
    monkeypatch.setattr(module, "sample_recovered_tokens", module.sample_recovered_tokens)
    monkeypatch.setenv("DAS_VLLM", "1")
    from service.vllm_backend import plugin

    plugin.register()
    # apply_sampling_constraints calls it by this name for temperature and top_p.
    assert torch.equal(module.expand_batch_to_tokens(TEMPERATURE, CU_TOKENS, 6), EXPECTED)
    assert module.sample_recovered_tokens is sampler_fix.sample_recovered_tokens  # by name


def recovered(function: Any, seeded: list[int], unseeded_seed: int) -> torch.Tensor:
    """Recovered tokens of a 5-row step where rows 1 and 3 carry no draft, as vLLM's
    rejection sampler asks for them; rows in `seeded` have their own generator."""
    data = torch.Generator().manual_seed(7)
    num_draft_tokens = [2, 0, 3, 0, 1]
    vocab = 1000
    tokens = sum(num_draft_tokens)
    target_probs = torch.rand((tokens, vocab), generator=data).softmax(dim=-1)
    draft_token_ids = torch.randint(0, vocab, (tokens,), generator=data, dtype=torch.int32)
    cu = torch.tensor(num_draft_tokens, dtype=torch.int32).cumsum(0).to(torch.int32)
    generators = {i: torch.Generator().manual_seed(100 + i) for i in seeded}
    torch.manual_seed(unseeded_seed)
    out: torch.Tensor = function(
        max(num_draft_tokens), num_draft_tokens, cu, draft_token_ids, None, target_probs,
        SimpleNamespace(generators=generators), torch.device("cpu"),
    )  # fmt: skip
    return out


def test_recovered_tokens_drawn_for_drafted_rows_only_match_vllms(cpu_kernels: None) -> None:
    """Seeded rows get the very tokens vLLM's function gives (their noise comes from their
    own generator either way); unseeded rows get valid tokens from the same distribution."""
    module = importlib.import_module("vllm.v1.sample.rejection_sampler")
    original = module.__dict__.get("_das_original_recovered", module.sample_recovered_tokens)
    assert original is not sampler_fix.sample_recovered_tokens
    every_row = [0, 1, 2, 3, 4]
    for seed in range(5):
        ours = recovered(sampler_fix.sample_recovered_tokens, every_row, seed)
        assert torch.equal(ours, recovered(original, every_row, seed))
    mixed = recovered(sampler_fix.sample_recovered_tokens, [2], 0)
    assert torch.equal(mixed[2:5], recovered(original, [2], 1)[2:5])  # row 2's 3 tokens
    assert mixed.dtype == torch.int32 and bool(((mixed >= 0) & (mixed < 1000)).all())


def test_recovered_tokens_keep_the_distribution(cpu_kernels: None) -> None:
    """With no draft probabilities a recovered token is a sample of the target distribution
    (the kernel takes argmax p / q over exponential q): ours, over many unseeded draws, gives
    each token its probability."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    counts = torch.zeros(4)
    torch.manual_seed(0)
    for _ in range(4000):
        token = sampler_fix.sample_recovered_tokens(
            1, [0, 1], torch.tensor([0, 1], dtype=torch.int32),
            torch.tensor([3], dtype=torch.int32), None, probs,
            SimpleNamespace(generators={}), torch.device("cpu"),
        )  # fmt: skip
        counts[int(token[0])] += 1
    frequencies = counts / counts.sum()
    assert torch.allclose(frequencies, probs[0], atol=0.03), frequencies
