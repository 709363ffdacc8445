"""vLLM issue 55005: on CPU, the rejection sampler's per-token temperature and top_p come
from a C++ kernel that writes into a temporary int64 copy, so they are never set. The test of
vLLM's own function documents the bug (when it fails, upstream fixed it and the fix can go);
the plugin test fails without our fix."""

from __future__ import annotations

import importlib

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
    monkeypatch.setenv("DAS_VLLM", "1")
    from service.vllm_backend import plugin

    plugin.register()
    # apply_sampling_constraints calls it by this name for temperature and top_p.
    assert torch.equal(module.expand_batch_to_tokens(TEMPERATURE, CU_TOKENS, 6), EXPECTED)
