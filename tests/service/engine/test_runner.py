from __future__ import annotations

import pytest
import torch

from service.engine import _kernels
from service.engine.models import Tokenizer
from service.engine.runner import Runner, _AttentionPlan, _TreeMask

CPU = torch.device("cpu")


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(torch.tensor([tokens])).logits[0]
    return logits


def check_ragged_steps(
    model: torch.nn.Module,
    atol: float,
    batched_max_chunk: int = 32,
    small_matmul: bool = True,
    native_attention: bool = True,
) -> None:
    """Prefill three slots with different prompt lengths, then ragged steps with rollback
    and re-feeding; every logit row must equal Hugging Face's forward of the full prefix.
    With small_matmul, steps of at most 64 tokens take the native small-batch matmul where it
    applies, whether or not it is faster on this machine; with native_attention, chunks of at
    most batched_max_chunk tokens attend in the native kernel where it applies."""
    runner = Runner(
        model,
        slots=4,
        max_len=64,
        batched_max_chunk=batched_max_chunk,
        small_matmul=small_matmul,
        small_matmul_rows=64,
        native_attention=native_attention,
    )
    assert runner.small_matmul == (small_matmul and _kernels.available())
    assert runner.native_attention == (native_attention and _kernels.available())
    generator = torch.Generator().manual_seed(0)
    vocab = runner.vocab_size
    seqs = [torch.randint(0, vocab, (48,), generator=generator).tolist() for _ in range(3)]
    slots = [3, 0, 2]
    # (per slot: tokens to feed this step), rollback (slot, length) applied after the step.
    steps: list[tuple[list[int], dict[int, int]]] = [
        ([10, 4, 17], {}),
        ([1, 5, 3], {3: 9, 2: 19}),  # reject part of the chunk: re-fed below
        ([6, 1, 9], {0: 10}),
        ([2, 8, 1], {}),
        # Chunks of one width class share a padded call, the odd one out attends alone.
        ([1, 1, 9], {2: 33}),
        ([3, 4, 1], {}),
    ]
    fed = {slot: 0 for slot in slots}
    for sizes, rollbacks in steps:
        chunks = [
            seqs[i][fed[s] : fed[s] + n] for i, (s, n) in enumerate(zip(slots, sizes, strict=True))
        ]
        logits = runner.forward(slots, chunks)
        expected = []
        for i, (slot, size) in enumerate(zip(slots, sizes, strict=True)):
            end = fed[slot] + size
            expected.append(hf_logits(model, seqs[i][:end])[end - size :])
            fed[slot] = end
        torch.testing.assert_close(logits, torch.cat(expected), atol=atol, rtol=0)
        for slot, length in rollbacks.items():
            runner.truncate(slot, length)
            fed[slot] = length
    assert runner.lengths[1] == 0


@pytest.mark.parametrize("native_attention", [True, False], ids=["native-attn", "torch-attn"])
@pytest.mark.parametrize("small_matmul", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("batched_max_chunk", [32, 0], ids=["batched", "looped"])
def test_runner_matches_hf_on_ragged_batches_with_rollback(
    tiny_model: torch.nn.Module, batched_max_chunk: int, small_matmul: bool, native_attention: bool
) -> None:
    check_ragged_steps(tiny_model, 1e-4, batched_max_chunk, small_matmul, native_attention)


def test_num_logits_returns_the_last_rows(tiny_model: torch.nn.Module) -> None:
    runner = Runner(tiny_model, slots=2, max_len=32)
    full = Runner(tiny_model, slots=2, max_len=32)
    chunks = [[1, 2, 3, 4, 5], [6, 7, 8]]
    last = runner.forward([0, 1], chunks, num_logits=[2, 1])
    everything = full.forward([0, 1], chunks)
    torch.testing.assert_close(last, everything[[3, 4, 7]], atol=1e-5, rtol=0)


@pytest.mark.skipif(not _kernels.available(), reason="the native kernel needs AVX2 and FMA")
def test_small_matmul_rows_decides_which_forwards_take_the_native_kernel(
    tiny_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    native = _kernels.linear

    def counted(x: torch.Tensor, *args: object) -> None:
        calls.append(x.shape[0])
        native(x, *args)

    monkeypatch.setattr(_kernels, "linear", counted)
    runner = Runner(tiny_model, slots=2, max_len=32, small_matmul_rows=4)
    assert runner.small_matmul_rows == (1, 4)
    runner.forward([0, 1], [[1, 2], [3, 4]])
    assert calls and set(calls) == {4}
    calls.clear()
    runner.forward([0, 1], [[5, 6, 7], [8, 9]])  # 5 tokens: torch
    assert calls == []
    runner.small_matmul_rows = (2, 4)  # as measured where torch wins at 1 row
    runner.forward([0], [[10]])
    assert calls == []
    runner.forward([0], [[11, 12]])
    assert calls and set(calls) == {2}
    assert Runner(tiny_model, slots=1, max_len=8, small_matmul=False).small_matmul_rows == (0, 0)


def test_measured_small_matmul_rows_are_timed_row_counts_and_kept(
    tiny_model: torch.nn.Module,
) -> None:
    runner = Runner(tiny_model, slots=1, max_len=8)
    counts = {0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 64}
    first, last = runner.small_matmul_rows
    assert first in counts and last in counts and first <= last
    assert (first == 0) == (last == 0)
    assert runner.small_matmul == (last > 0)
    # Measured once per set of weights: a second runner on the same model reads the result.
    assert Runner(tiny_model, slots=1, max_len=8).small_matmul_rows == runner.small_matmul_rows


def test_runner_rejects_bad_batches(tiny_model: torch.nn.Module) -> None:
    runner = Runner(tiny_model, slots=2, max_len=8)
    with pytest.raises(ValueError, match="exceed"):
        runner.forward([0], [list(range(9))])
    with pytest.raises(ValueError, match="once"):
        runner.forward([0, 0], [[1], [2]])
    with pytest.raises(ValueError, match="empty"):
        runner.forward([1], [[]])
    with pytest.raises(ValueError, match="num_logits"):
        runner.forward([1], [[1, 2]], num_logits=[3])
    with pytest.raises(ValueError, match="truncate"):
        runner.truncate(0, 1)
    with pytest.raises(ValueError, match="slots"):
        Runner(tiny_model, slots=0, max_len=8)


@pytest.mark.slow
def test_runner_matches_hf_on_smollm2(smollm2: tuple[torch.nn.Module, Tokenizer]) -> None:
    model, _ = smollm2
    # SmolLM2's logits reach about 30; the kernels sum in another order than Hugging Face's
    # MKL (the AVX-512 one was off by up to 1.1e-4 here, 7 of 1.5 million logits over 1e-4).
    check_ragged_steps(model, 2e-4, batched_max_chunk=32)
    check_ragged_steps(model, 2e-4, batched_max_chunk=0)


def test_copy_prefix_shares_a_prompt(tiny_model: torch.nn.Module) -> None:
    runner = Runner(tiny_model, slots=3, max_len=16)
    prompt = [3, 1, 4, 1, 5, 9]
    runner.forward([0], [prompt])
    runner.copy_prefix(0, 2, 5)
    assert runner.lengths[2] == 5
    logits = runner.forward([2], [[prompt[-1], 2]])
    torch.testing.assert_close(logits, hf_logits(tiny_model, [*prompt, 2])[-2:], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="holds"):
        runner.copy_prefix(1, 2, 1)


def test_native_attention_takes_every_short_chain_chunk() -> None:
    # Scattered widths, a long prefill chunk (past max_chunk 32) and a tree chunk.
    slots, sizes = [0, 3, 5, 6, 7], [1, 3, 40, 2, 5]
    tree = _TreeMask.build_all([[0] * n for n in sizes], [None] * 4 + [[-1, -1, 0]], CPU)
    plan = _AttentionPlan.by_width(slots, [20] * 5, sizes, 32, CPU, tree, native_threads=2)
    assert plan.native is not None and plan.native.threads == 2
    # (offset, slot, start, size) of chunks 0, 1 and 3; the long chunk and the tree attend alone.
    assert plan.native.chunks.tolist() == [[0, 0, 20, 1], [1, 3, 20, 3], [44, 6, 20, 2]]
    assert not plan.grids
    assert [loop.slot for loop in plan.loops] == [5, 7]
    assert _AttentionPlan.by_width(slots, [20] * 5, sizes, 32, CPU).native is None


def _plan_groups(slots: list[int], sizes: list[int]) -> tuple[list[list[int]], list[int]]:
    """The token indices of each padded call, and the slots attending alone."""
    plan = _AttentionPlan.by_width(slots, [20] * len(slots), sizes, 32, torch.device("cpu"))
    return [g.tokens.tolist() for g in plan.grids], [loop.slot for loop in plan.loops]


def test_attention_plan_groups_chunks_by_width() -> None:
    # A decode step: every token in one call.
    assert _plan_groups([0, 1, 2], [1, 1, 1]) == ([[0, 1, 2]], [])
    # One draft among one-token rows: it must not widen their call.
    assert _plan_groups([0, 1, 2, 3], [1, 9, 1, 1]) == ([[0, 10, 11]], [1])
    # Two drafts of one width class (9 and 12 tokens) share a call.
    assert _plan_groups([0, 1, 2], [9, 12, 1]) == ([list(range(21))], [2])
    # Rows filling less than half of their slot span, or past max_chunk, attend alone.
    assert _plan_groups([0, 7], [1, 1]) == ([], [0, 7])
    assert _plan_groups([0, 1], [40, 40]) == ([], [0, 1])
