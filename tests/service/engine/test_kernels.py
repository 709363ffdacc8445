"""The native small-batch matmul (service/engine/_native/small_gemm.cc)."""

from __future__ import annotations

import pytest
import torch

from service.engine import _kernels

pytestmark = pytest.mark.skipif(
    not _kernels.available(), reason="the kernel needs an x86-64 CPU with AVX2 and FMA"
)


def linear(x: torch.Tensor, w: torch.Tensor, threads: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0])
    _kernels.linear(x, w, out, threads)
    return out


@pytest.mark.parametrize("threads", [1, 2, 3, 200])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 16, 33, 64])
@pytest.mark.parametrize("out_features", [1, 2, 63, 129, 1000])
def test_linear_matches_torch(rows: int, out_features: int, threads: int) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, 96, generator=generator)
    w = torch.randn(out_features, 96, generator=generator)
    torch.testing.assert_close(linear(x, w, threads), x @ w.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_result_does_not_depend_on_its_companions(threads: int) -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(23, 576, generator=generator)
    w = torch.randn(517, 576, generator=generator)
    alone = torch.cat([linear(x[i : i + 1], w, threads) for i in range(len(x))])
    for rows in (2, 3, 4, 5, 9, 23):
        together = torch.cat([linear(x[i : i + rows], w, threads) for i in range(0, 23, rows)])
        assert torch.equal(together, alone)  # bitwise: same FMA chain for every row


def test_linear_rejects_bad_shapes() -> None:
    x, w = torch.randn(2, 16), torch.randn(5, 16)
    with pytest.raises(ValueError, match="K"):
        linear(torch.randn(2, 12), torch.randn(5, 12), 1)  # K not a multiple of 8
    with pytest.raises(ValueError, match="disagree"):
        linear(x, torch.randn(5, 24), 1)
    with pytest.raises(ValueError, match="rows"):
        _kernels.linear(x, w, torch.empty(2, 4), 1)
    with pytest.raises(ValueError, match="threads"):
        _kernels.linear(x, w, torch.empty(2, 5), 0)
    # Never a hidden copy: not C-contiguous, or not float32, is refused.
    with pytest.raises(TypeError):
        _kernels.linear(x, torch.randn(16, 5).T, torch.empty(2, 5), 1)
    with pytest.raises(TypeError):
        _kernels.linear(x, w, torch.empty(5, 2).T, 1)
    with pytest.raises(TypeError):
        _kernels.linear(x.double(), w, torch.empty(2, 5), 1)
