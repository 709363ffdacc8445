"""The engine's native kernels: the small-batch matmul (service/engine/_native/small_gemm.cc) and
ragged attention (ragged_attention.cc)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.engine import _kernels

pytestmark = pytest.mark.skipif(
    not _kernels.available(), reason="the kernel needs an x86-64 CPU with AVX2 and FMA"
)


# The AVX2 kernel runs on every CPU the module supports; the AVX-512 one only where it has
# AVX-512F (the runner picks it there).
KERNELS = [
    pytest.param(False, id="avx2"),
    pytest.param(
        True,
        id="avx512",
        marks=pytest.mark.skipif(
            not (_kernels.available() and _kernels.has_avx512()), reason="no AVX-512F here"
        ),
    ),
]


def linear(x: torch.Tensor, w: torch.Tensor, threads: int, avx512: bool) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0])
    _kernels.linear(x, w, out, threads, avx512)
    return out


@pytest.mark.parametrize("avx512", KERNELS)
@pytest.mark.parametrize("threads", [1, 2, 3, 200])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 9, 13, 16, 33, 64])
@pytest.mark.parametrize(
    ("out_features", "in_features"), [(1, 96), (2, 8), (63, 96), (129, 24), (1000, 96)]
)
def test_linear_matches_torch(
    rows: int, out_features: int, in_features: int, threads: int, avx512: bool
) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    w = torch.randn(out_features, in_features, generator=generator)
    torch.testing.assert_close(linear(x, w, threads, avx512), x @ w.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("avx512", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_result_does_not_depend_on_its_companions(threads: int, avx512: bool) -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(23, 584, generator=generator)  # 584 = 36 * 16 + 8: a masked last vector
    w = torch.randn(517, 584, generator=generator)
    alone = torch.cat([linear(x[i : i + 1], w, threads, avx512) for i in range(len(x))])
    for rows in (2, 3, 4, 5, 6, 7, 9, 13, 23):
        together = torch.cat(
            [linear(x[i : i + rows], w, threads, avx512) for i in range(0, 23, rows)]
        )
        assert torch.equal(together, alone)  # bitwise: same FMA chain for every row


def test_linear_rejects_bad_shapes() -> None:
    x, w = torch.randn(2, 16), torch.randn(5, 16)
    with pytest.raises(ValueError, match="K"):
        linear(torch.randn(2, 12), torch.randn(5, 12), 1, False)  # K not a multiple of 8
    with pytest.raises(ValueError, match="disagree"):
        linear(x, torch.randn(5, 24), 1, False)
    with pytest.raises(ValueError, match="rows"):
        _kernels.linear(x, w, torch.empty(2, 4), 1, False)
    with pytest.raises(ValueError, match="threads"):
        _kernels.linear(x, w, torch.empty(2, 5), 0, False)
    # Never a hidden copy: not C-contiguous, or not float32, is refused.
    with pytest.raises(TypeError):
        _kernels.linear(x, torch.randn(16, 5).T, torch.empty(2, 5), 1, False)
    with pytest.raises(TypeError):
        _kernels.linear(x, w, torch.empty(5, 2).T, 1, False)
    with pytest.raises(TypeError):
        _kernels.linear(x.double(), w, torch.empty(2, 5), 1, False)
    if not _kernels.has_avx512():
        with pytest.raises(RuntimeError, match="AVX-512"):
            _kernels.linear(x, w, torch.empty(2, 5), 1, True)


Chunk = tuple[int, int, int]  # (slot, start, size)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: list[Chunk], threads: int
) -> torch.Tensor:
    """The kernel's output for chunks laid out in q in order."""
    offsets = [0]
    for _, _, size in chunks:
        offsets.append(offsets[-1] + size)
    table = torch.tensor(
        [[o, slot, start, size] for o, (slot, start, size) in zip(offsets, chunks, strict=False)],
        dtype=torch.int64,
    ).reshape(-1, 4)
    out = torch.full_like(q, float("nan"))
    _kernels.attention(q, k, v, out, table, q.shape[-1] ** -0.5, threads)
    return out


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: list[Chunk]
) -> torch.Tensor:
    """Torch's attention, one chunk at a time: token i sees positions <= start + i."""
    out, offset = [], 0
    for slot, start, size in chunks:
        end = start + size
        mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        attended = F.scaled_dot_product_attention(
            q[offset : offset + size].transpose(0, 1)[None],
            k[slot, :, :end][None],
            v[slot, :, :end][None],
            attn_mask=mask,
            enable_gqa=True,
        )
        out.append(attended[0].transpose(0, 1))
        offset += size
    return torch.cat(out)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize(("dim", "heads", "kv_heads"), [(16, 4, 2), (64, 9, 3), (128, 4, 4)])
@pytest.mark.parametrize("seed", range(4))
def test_attention_matches_torch_on_ragged_chunks(
    seed: int, dim: int, heads: int, kv_heads: int, threads: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    slots, max_len = 6, 70
    k = torch.randn(slots, kv_heads, max_len, dim, generator=generator)
    v = torch.randn(slots, kv_heads, max_len, dim, generator=generator)
    chunks: list[Chunk] = []
    for slot in torch.randperm(slots, generator=generator)[:4].tolist():
        size = int(torch.randint(1, 18, (1,), generator=generator))  # decode rows and drafts
        start = int(torch.randint(0, max_len - size + 1, (1,), generator=generator))
        chunks.append((slot, start, size))  # from a chunk at position 0 to one at the cache's end
    q = 3 * torch.randn(sum(c[2] for c in chunks), heads, dim, generator=generator)
    torch.testing.assert_close(
        attention(q, k, v, chunks, threads), reference_attention(q, k, v, chunks), atol=1e-5, rtol=0
    )


def test_attention_leaves_rows_of_other_tokens_alone() -> None:
    k = v = torch.randn(2, 1, 8, 16)
    q = torch.randn(5, 2, 16)
    out = torch.full_like(q, 7.0)
    table = torch.tensor([[1, 0, 2, 3]], dtype=torch.int64)  # tokens 1-3 only
    _kernels.attention(q, k, v, out, table, 0.25, 2)
    assert torch.equal(out[0], torch.full_like(out[0], 7.0))
    assert torch.equal(out[4], torch.full_like(out[4], 7.0))
    expected = reference_attention(q[1:4], k, v, [(0, 2, 3)])
    torch.testing.assert_close(out[1:4], expected, atol=1e-5, rtol=0)


def test_attention_rejects_bad_shapes() -> None:
    q, k = torch.randn(3, 4, 16), torch.randn(2, 2, 8, 16)
    out = torch.empty(3, 4, 16)

    def call(table: list[list[int]], **override: torch.Tensor) -> None:
        args = {"q": q, "k": k, "v": k, "out": out} | override
        chunks = torch.tensor(table, dtype=torch.int64).reshape(-1, 4)
        _kernels.attention(args["q"], args["k"], args["v"], args["out"], chunks, 0.25, 1)

    call([[0, 1, 5, 3]])  # in bounds
    for bad in ([[1, 0, 0, 3]], [[0, 2, 0, 1]], [[0, 0, 6, 3]], [[0, 0, 0, 0]], [[-1, 0, 0, 1]]):
        with pytest.raises(ValueError, match="out of bounds"):
            call(bad)
    with pytest.raises(ValueError, match="head dim"):
        call([], q=torch.randn(3, 4, 24), k=torch.randn(2, 2, 8, 24), out=torch.empty(3, 4, 24))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        k3 = torch.randn(2, 3, 8, 16)
        call([], k=k3, v=k3)
    with pytest.raises(ValueError, match="differ in shape"):
        call([], v=torch.randn(2, 2, 9, 16))
    with pytest.raises(ValueError, match="q's shape"):
        call([], out=torch.empty(2, 4, 16))
    with pytest.raises(TypeError):  # never a hidden copy
        call([], k=torch.randn(2, 8, 2, 16).transpose(1, 2))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cols, block", [(49152, 256), (700, 256), (37, 8), (5, 16)])
def test_block_logsumexp_matches_torch(cols: int, block: int, threads: int) -> None:
    """Each block's log-sum-exp of scale * x[index[i]] as torch computes it (rows picked in any
    order and repeated, a last partial block, -inf entries and a block of -inf only), and a
    row's values the same whatever rows come with it."""
    x = torch.randn(6, cols, generator=torch.Generator().manual_seed(cols)) * 4
    x[1, : block + 3] = float("-inf")  # the first block filtered, the second partly
    x[2, -2:] = -200.0  # far below the rest of its block
    index = torch.tensor([4, 1, 1, 2, 0])
    blocks = -(-cols // block)
    out = torch.empty(len(index), blocks)
    _kernels.block_logsumexp(x, index, 0.7, out, block, threads)
    padded = F.pad(x[index] * 0.7, (0, blocks * block - cols), value=float("-inf"))
    expected = padded.view(len(index), blocks, block).logsumexp(dim=-1)
    assert torch.equal(out.isinf(), expected.isinf())
    assert out[1, 0] == float("-inf")
    finite = expected.isfinite()
    assert torch.allclose(out[finite], expected[finite], rtol=1e-6, atol=1e-5)
    alone = torch.empty(1, blocks)
    _kernels.block_logsumexp(x, torch.tensor([2]), 0.7, alone, block, threads)
    assert torch.equal(alone[0], out[3])


def test_block_logsumexp_checks_its_arguments() -> None:
    x, out = torch.zeros(2, 8), torch.empty(1, 1)
    with pytest.raises(ValueError, match="out of x's rows"):
        _kernels.block_logsumexp(x, torch.tensor([2]), 1.0, out, 8, 1)
    with pytest.raises(ValueError, match="scale"):
        _kernels.block_logsumexp(x, torch.tensor([0]), 0.0, out, 8, 1)
    with pytest.raises(ValueError, match="out must be"):
        _kernels.block_logsumexp(x, torch.tensor([0]), 1.0, torch.empty(1, 2), 8, 1)
