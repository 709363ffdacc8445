from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.sampling import (
    RACE_BLOCK,
    Span,
    block_logsumexp,
    exponential_race,
    position_keys,
    processed_logits,
    sample,
    sample_spans,
    splitmix64,
)
from service.worker import SamplingParams

SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, logprobs=True, top_logprobs=3)


def logits_rows(rows: int = 4, vocab: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_splitmix64_known_value() -> None:
    # splitmix64's first output from state 0 (the reference C implementation).
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF


def uniforms(seed: int, sample_index: int, positions: np.ndarray) -> np.ndarray:
    """The keys' top 53 bits as uniforms in [0, 1), to look at their statistics."""
    keys = position_keys(seed, sample_index, positions)
    return (keys >> np.uint64(11)).astype(np.float64) / (1 << 53)


def test_position_keys_are_a_pure_function_of_the_key() -> None:
    a = position_keys(123, 2, [0, 1, 2, 3])
    assert np.array_equal(a, position_keys(123, 2, [0, 1, 2, 3]))
    assert np.array_equal(a[2:], position_keys(123, 2, [2, 3]))  # no state: positions alone


def test_position_keys_differ_by_sample_index_seed_and_position() -> None:
    positions = np.arange(20_000)
    first = uniforms(7, 0, positions)
    second = uniforms(7, 1, positions)
    other_seed = uniforms(8, 0, positions)
    for other in (second, other_seed):
        assert abs(np.corrcoef(first, other)[0, 1]) < 0.03
        assert (first != other).mean() > 0.999
    assert abs(np.corrcoef(first[:-1], first[1:])[0, 1]) < 0.03
    assert abs(first.mean() - 0.5) < 0.01


def test_greedy_is_the_argmax_and_ignores_the_key() -> None:
    logits = logits_rows()
    greedy = SamplingParams(temperature=0.0, logprobs=True)
    a = sample(logits, greedy, seed=1, sample_index=0, first_position=0)
    b = sample(logits, greedy, seed=2, sample_index=3, first_position=9)
    assert a.token_ids == b.token_ids == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1).max(-1).values.tolist()
    assert a.logprobs == pytest.approx(expected, abs=1e-6)


def test_same_key_same_token_and_row_independence() -> None:
    logits = logits_rows(rows=6)
    whole = sample(logits, SAMPLED, seed=5, sample_index=1, first_position=10)
    again = sample(logits, SAMPLED, seed=5, sample_index=1, first_position=10)
    assert whole == again
    # Row i is position 10 + i whatever rows are drawn with it.
    tail = sample(logits[3:], SAMPLED, seed=5, sample_index=1, first_position=13)
    assert tail.token_ids == whole.token_ids[3:]
    assert tail.logprobs == pytest.approx(whole.logprobs[3:], abs=1e-6)


def test_sampled_tokens_stay_inside_top_k_and_top_p() -> None:
    logits = logits_rows(rows=64, vocab=300, seed=3)
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.8)
    probs = processed_logits(logits, params).softmax(-1)
    assert ((probs > 0).sum(-1) <= 5).all()
    assert torch.allclose(probs.sum(-1), torch.ones(64))
    drawn = sample(logits, params, seed=0, sample_index=0, first_position=0).token_ids
    assert all(probs[row, token] > 0 for row, token in enumerate(drawn))


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = processed_logits(logits, SamplingParams(temperature=1.0, top_p=0.75)).softmax(-1)
    assert probs[0].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])


def test_draws_follow_the_processed_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]]).expand(20_000, -1)
    params = SamplingParams(temperature=0.7)
    drawn = sample(logits, params, seed=11, sample_index=0, first_position=0).token_ids
    frequencies = np.bincount(drawn, minlength=5) / len(drawn)
    expected = processed_logits(logits[:1], params).softmax(-1)[0].numpy()
    assert np.abs(frequencies - expected).max() < 0.015


def test_the_two_round_race_draws_each_token_with_its_probability() -> None:
    # A vocabulary over three blocks of RACE_BLOCK ids, the last one partial, with a filtered
    # stretch across a block boundary and one whole block filtered: the block round and the
    # token round together must give every token its probability, and never a filtered one.
    assert RACE_BLOCK == 256
    log_weights = torch.randn(1, 700, generator=torch.Generator().manual_seed(5)) * 1.5
    log_weights[0, 240:520] = float("-inf")
    draws = 60_000
    drawn = exponential_race(log_weights.expand(draws, -1), position_keys(3, 0, np.arange(draws)))
    frequencies = np.bincount(drawn.numpy(), minlength=700) / draws
    assert len(frequencies) == 700
    expected = log_weights.softmax(-1)[0].numpy()
    assert frequencies[240:520].sum() == 0
    bound = 4.5 * np.sqrt(expected * (1 - expected) / draws) + 1e-4
    assert (np.abs(frequencies - expected) <= bound).all()


@pytest.mark.parametrize("filtered", [False, True])
def test_a_token_of_negligible_probability_is_never_drawn(filtered: bool) -> None:
    # Racing one float32 exponential per token of a 49k vocabulary, a draw of exactly 0 (about
    # once in 10 million) made its token win whatever its probability, a filtered one too
    # (-inf - -inf is NaN, which argmax takes): 18 of 4,000 such positions drew a token of
    # probability e^-100, and 18 a filtered one.
    positions, vocab = 2000, 49152
    logits = torch.full((positions, vocab), float("-inf") if filtered else -100.0)
    logits[:, [7, 9]] = 0.0
    params = SamplingParams(temperature=1.0, top_k=2 if filtered else -1)
    drawn = np.array(sample(logits, params, seed=0, sample_index=0, first_position=0).token_ids)
    assert set(drawn.tolist()) == {7, 9}


def test_logprobs_raw_and_processed() -> None:
    logits = logits_rows(rows=2)
    raw = sample(logits, SAMPLED, seed=1, sample_index=0, first_position=0)
    processed = sample(logits, SAMPLED, 1, 0, 0, logprobs_mode="processed")
    assert raw.token_ids == processed.token_ids
    log_softmax = logits.log_softmax(-1)
    for row, token in enumerate(raw.token_ids):
        assert raw.logprobs[row] == pytest.approx(float(log_softmax[row, token]), abs=1e-6)
    probs = processed_logits(logits, SAMPLED).softmax(-1)
    for row, token in enumerate(raw.token_ids):
        assert processed.logprobs[row] == pytest.approx(float(probs[row, token].log()), abs=1e-5)
    assert raw.top_logprobs is not None
    assert [len(top) for top in raw.top_logprobs] == [3, 3]
    best = log_softmax[0].topk(3)
    assert list(raw.top_logprobs[0]) == best.indices.tolist()


def reference_top_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """processed_logits by the book: sort the whole vocabulary."""
    scaled = logits.float() / params.temperature
    if params.top_k > 0:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    ordered = probs.sort(dim=-1, descending=True).values
    kept = ((ordered.cumsum(dim=-1) - ordered) < params.top_p).sum(dim=-1, keepdim=True)
    return scaled.masked_fill(probs < ordered.gather(-1, kept - 1), float("-inf"))


@pytest.mark.parametrize("top_k", [0, 200])
def test_top_p_shortcut_matches_a_full_sort(top_k: int) -> None:
    # Peaked rows are decided among the first candidates, flatter ones need the top 1024
    # or the full sort; a row of ties keeps every tied token.
    generator = torch.Generator().manual_seed(4)
    scale = torch.tensor([[12.0], [4.0], [1.5], [0.2], [0.0]])
    logits = torch.randn(5, 3000, generator=generator) * scale
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=top_k)
    torch.testing.assert_close(
        processed_logits(logits, params), reference_top_p(logits, params), atol=0, rtol=0
    )


def test_the_race_ignores_rounding_sized_changes_to_the_distribution() -> None:
    # A long tail of tiny probabilities, as a language model's: the draw must not move when the
    # logits change by rounding (up to 8.6e-5 measured between a verify chunk and single steps
    # of SmolLM2 in fp32; here up to 1e-4).
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4000, 5000, generator=generator, dtype=torch.float64) * 4
    nudged = (
        logits + (torch.rand(logits.shape, generator=generator, dtype=torch.float64) - 0.5) * 2e-4
    )
    keys = position_keys(11, 0, np.arange(len(logits)))
    first = exponential_race(logits, keys)
    second = exponential_race(nudged, keys)
    assert (first != second).sum().item() == 0
    # The same nudge moves inverse-CDF draws (token-id order) many times more often.
    u = torch.from_numpy(uniforms(11, 0, np.arange(len(logits))))[:, None]
    by_cdf = [torch.searchsorted(p.softmax(-1).cumsum(-1), u)[:, 0] for p in (logits, nudged)]
    assert (by_cdf[0] != by_cdf[1]).sum().item() >= 10


@pytest.mark.parametrize(
    "params",
    [
        SAMPLED,
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2),
        SamplingParams(temperature=1.0),
    ],
)
@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_a_draft_stops_the_draws_at_its_first_rejected_token(
    params: SamplingParams, mode: str
) -> None:
    """With the draft given, the rows drawn are the full draw's up to the first row whose token
    differs from the draft's (or the row after the draft), tokens and logprobs alike."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        rows = int(rng.integers(1, 7))
        logits = logits_rows(rows, seed=trial)
        full = sample(logits, params, 5, 1, 3 * trial, mode)  # type: ignore[arg-type]
        agree = int(rng.integers(0, rows))  # the draft matches this many tokens, then differs
        draft = full.token_ids[:agree]
        if agree < rows - 1 and rng.random() < 0.7:
            draft += [(full.token_ids[agree] + 1) % 200, *rng.integers(0, 200, rows - 2 - agree)]
        cut = sample(logits, params, 5, 1, 3 * trial, mode, draft=draft)  # type: ignore[arg-type]
        drawn = min(agree, len(draft)) + 1
        assert cut.token_ids == full.token_ids[:drawn]
        assert cut.logprobs == full.logprobs[:drawn]
        expected_top = None if full.top_logprobs is None else full.top_logprobs[:drawn]
        assert cut.top_logprobs == expected_top


@pytest.mark.parametrize("mode", ["raw", "processed"])
def test_sample_spans_equals_sample_per_span(mode: str) -> None:
    """One call for many samples' rows (greedy and sampled, other top-k / top-p / top
    logprobs, drafts cut anywhere, in any order) draws each span's tokens, logprobs and top
    logprobs exactly as sample() on its rows alone."""
    kinds = [
        SAMPLED,
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2),
    ]
    rng = np.random.default_rng(4)
    for trial in range(12):
        logits = logits_rows(48, vocab=600, seed=trial)  # the race's blocks: 3, one partial
        spans, expected = [], []
        start = 0
        while start < len(logits):
            rows = min(int(rng.integers(1, 7)), len(logits) - start)
            params = kinds[int(rng.integers(len(kinds)))]
            seed, index, position = int(rng.integers(2**63)), int(rng.integers(8)), start * 7
            mine = logits[start : start + rows]
            draft = None
            if rng.random() < 0.8:  # a draft agreeing with the draws for a while, then not
                full = sample(mine, params, seed, index, position, mode)  # type: ignore[arg-type]
                agree = int(rng.integers(0, rows))
                draft = full.token_ids[:agree] + [(t + 1) % 600 for t in full.token_ids[agree:]]
                draft = draft[: rows - 1]
            spans.append(Span(start, rows, params, seed, index, position, draft))
            expected.append(sample(mine, params, seed, index, position, mode, draft))  # type: ignore[arg-type]
            start += rows
        order = rng.permutation(len(spans)).tolist()
        drawn = sample_spans(logits, [spans[i] for i in order], mode)  # type: ignore[arg-type]
        assert [drawn[order.index(i)] for i in range(len(spans))] == expected
        assert any(len(e.token_ids) > 1 for e in expected)  # some drafts were accepted


def test_block_logsumexp_torch_path_matches_the_kernels() -> None:
    """The torch path (any logits but float32 on a CPU: a GPU's, or bf16) gives what the native
    kernel gives on this CPU (or, where it has no kernel, itself): rows picked, scaled, a last
    partial block, a block of -inf only."""
    x = logits_rows(5, vocab=700, seed=9)
    x[2, :256] = float("-inf")
    rows = torch.tensor([3, 2, 0])
    native = block_logsumexp(x, RACE_BLOCK, rows, 1 / 0.7)
    torch_path = block_logsumexp(x.double(), RACE_BLOCK, rows, 1 / 0.7)
    assert native.shape == torch_path.shape == (3, 3)
    assert native[1, 0] == torch_path[1, 0] == float("-inf")
    assert torch.allclose(native[:, 1:], torch_path[:, 1:].float(), rtol=1e-6, atol=1e-5)
