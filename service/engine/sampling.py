"""Sampling parameters, logits processing and the counter-based draw.

Each output position's token is drawn with randomness keyed by hashing (seed, sample index,
position): no generator state is carried between positions, so the token the target model
samples at a position does not depend on how many forwards it took to get there. That is what
makes speculation lossless: a draft token is accepted exactly when it equals that token.

The draw is an exponential race: token = argmax_i p_i / E_i, with E_i ~ Exp(1) drawn per token
from a Philox stream keyed by the position's key; P(token = i) = p_i exactly. It runs in log
space, argmax_i (log p_i - log E_i), on the processed logits (the normaliser is the same for
every token, so no softmax is needed). Logits computed with other batch shapes (a verify chunk,
other companions) differ by rounding (~1e-5), and the race only changes winner when its two best
scores are that close. An inverse CDF in token-id order, tried first, flipped whenever the
uniform landed among low-probability tokens narrower than the rounding shift of the cumulative
sum: one rollout in 64 on SmolLM2 at temperature 0.7.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from service.worker import SamplingParams

LogprobsMode = Literal["raw", "processed"]

_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class Sampled:
    """Tokens drawn at consecutive positions of one sample, with their logprobs."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None  # per position, when params.top_logprobs


def splitmix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The splitmix64 finaliser (Steele et al.), vectorised; wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def position_keys(seed: int, sample_index: int, positions: npt.ArrayLike) -> npt.NDArray[np.uint64]:
    """One 64-bit key per position, a pure function of (seed, sample_index, position)."""
    key = splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = splitmix64(key ^ np.uint64(sample_index & _MASK64))
    counters = np.asarray(positions, dtype=np.uint64)
    return splitmix64(key ^ splitmix64(counters))


def race_noise(keys: npt.NDArray[np.uint64], vocab: int) -> Tensor:
    """[rows, vocab] float32: log E, E ~ Exp(1), row i from the Philox stream keyed by keys[i]
    (about 0.35 ms per 49k-token row on this CPU; torch's exponential_ takes 1 ms)."""
    noise = np.empty((len(keys), vocab), dtype=np.float32)
    for row, key in enumerate(keys.tolist()):
        stream = np.random.Generator(np.random.Philox(key=key))
        stream.standard_exponential(dtype=np.float32, out=noise[row])
    return torch.from_numpy(noise).log_()


def exponential_race(log_weights: Tensor, keys: npt.NDArray[np.uint64]) -> Tensor:
    """Row i's token: argmax_j log_weights[i, j] - log E_ij (= argmax_j w_ij / E_ij), the noise
    from race_noise(keys). A -inf (filtered) token never wins."""
    noise = race_noise(keys, log_weights.shape[-1]).to(log_weights.device)
    return (log_weights - noise).argmax(dim=-1)


def processed_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """float32 [rows, vocab]: the logits of the distribution sampled from (its softmax):
    temperature, then top-k, then top-p (the smallest set of most likely tokens whose mass
    reaches top_p; ties at the boundary are kept); filtered tokens are -inf."""
    scaled = logits.float() / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        probs = scaled.softmax(dim=-1)
        threshold = _top_p_threshold(probs, params.top_p, params.top_k)
        scaled = scaled.masked_fill(probs < threshold, float("-inf"))
    return scaled


def _top_p_threshold(probs: Tensor, top_p: float, top_k: int) -> Tensor:
    """[rows, 1]: the smallest probability inside each row's top-p set.

    Sorting the whole vocabulary is the slow part of sampling, and the top-p set nearly
    always lies among the few most likely tokens (at most top_k of them are non-zero): look
    there first (topk returns them sorted), then in the top 1024, and sort in full only the
    rows whose candidates still fall short of top_p. The cumulative sum runs in order over
    the same leading values whichever pass decides, so the answer does not depend on it.
    """
    vocab = probs.shape[-1]
    first = top_k if 0 < top_k < vocab else 64
    threshold = torch.empty(probs.shape[0], 1, dtype=probs.dtype, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    for size in (first, 1024, vocab):
        size = min(size, vocab)
        if size == vocab:
            candidates = probs[rows].sort(dim=-1, descending=True).values
        else:
            candidates = probs[rows].topk(size, dim=-1).values
        decided = (candidates.sum(dim=-1) >= top_p) | (size == vocab)
        threshold[rows[decided]] = _threshold_in(candidates[decided], top_p)
        rows = rows[~decided]
        if len(rows) == 0:
            break
    return threshold


def _threshold_in(sorted_probs: Tensor, top_p: float) -> Tensor:
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = (mass_before < top_p).sum(dim=-1, keepdim=True)
    return sorted_probs.gather(-1, kept - 1)


def sample(
    logits: Tensor,
    params: SamplingParams,
    seed: int,
    sample_index: int,
    first_position: int,
    logprobs_mode: LogprobsMode = "raw",
    draft: Sequence[int] | None = None,
) -> Sampled:
    """Draw the token at positions first_position, first_position + 1, ... from each row of
    `logits` [rows, vocab] (row i is the target's prediction for position first_position + i).
    Temperature 0 is greedy: the first argmax of the raw logits. Logprobs are those of the raw
    logits (log_softmax) or, with logprobs_mode "processed", of the distribution sampled from.

    With `draft` (the tokens drafted at those positions), drawing stops at the first row whose
    token differs from the draft's, or the row after the draft: the rows after it would be
    thrown away (each row's draw is a function of that row alone, so the rows drawn are the
    same as without `draft`)."""
    processed = None
    if params.temperature == 0.0:
        token_ids = logits.argmax(dim=-1)
        if draft is not None:
            drawn = _accepted(token_ids.tolist(), draft) + 1
            token_ids, logits = token_ids[:drawn], logits[:drawn]
    else:
        processed = processed_logits(logits, params)
        keys = position_keys(seed, sample_index, first_position + np.arange(len(processed)))
        if draft is not None:
            chosen_ids: list[int] = []
            for row in range(len(processed)):
                token = int(exponential_race(processed[row : row + 1], keys[row : row + 1])[0])
                chosen_ids.append(token)
                if row >= len(draft) or token != draft[row]:
                    break
            drawn = len(chosen_ids)
            token_ids = torch.tensor(chosen_ids, dtype=torch.long, device=logits.device)
            processed, logits = processed[:drawn], logits[:drawn]
        else:
            token_ids = exponential_race(processed, keys)
    if logprobs_mode == "raw":
        logprobs = logits.float().log_softmax(dim=-1)
    elif processed is None:  # greedy: the processed distribution is a point mass
        logprobs = torch.full_like(logits, float("-inf"), dtype=torch.float32)
        logprobs.scatter_(-1, token_ids[:, None], 0.0)
    else:
        logprobs = processed.log_softmax(dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None])[:, 0]
    top = None
    if params.top_logprobs > 0:
        values, indices = logprobs.topk(min(params.top_logprobs, logprobs.shape[-1]), dim=-1)
        top = [
            dict(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    return Sampled(token_ids.tolist(), chosen.tolist(), top)


def _accepted(token_ids: Sequence[int], draft: Sequence[int]) -> int:
    """How many leading draft tokens equal the drawn ones."""
    accepted = 0
    while accepted < min(len(draft), len(token_ids)) and draft[accepted] == token_ids[accepted]:
        accepted += 1
    return accepted
