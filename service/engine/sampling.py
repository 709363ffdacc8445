"""Sampling parameters, logits processing and the counter-based draw.

Each output position's token is drawn with randomness keyed by hashing (seed, sample index,
position): no generator state is carried between positions, so the token the target model
samples at a position does not depend on how many forwards it took to get there. That is what
makes speculation lossless: a draft token is accepted exactly when it equals that token.

The draw is an exponential race: token = argmax_i p_i / E_i, with E_i ~ Exp(1) from a Philox
stream keyed by the position's key; P(token = i) = p_i exactly. It runs in log space,
argmax_i (log p_i - log E_i), on the processed logits (the normaliser is the same for every
token, so no softmax is needed), and in two rounds (exponential_race): blocks of token ids race
with their total weights, then the winning block's tokens, which draws a few hundred
exponentials a position instead of one per token of the vocabulary. Logits computed with other
batch shapes (a verify chunk, other companions) differ by rounding (~1e-5), and a round only
changes winner when its two best scores are that close. An inverse CDF in token-id order, tried
first, flipped whenever the uniform landed among low-probability tokens narrower than the
rounding shift of the cumulative sum: one rollout in 64 on SmolLM2 at temperature 0.7.
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


# The race runs in two rounds over blocks of this many consecutive token ids (the vocabulary
# padded with filtered tokens to whole blocks).
RACE_BLOCK = 256
_TINY = float(np.finfo(np.float64).tiny)  # the smallest normal double


def race_noise(keys: npt.NDArray[np.uint64], blocks: int) -> tuple[Tensor, Tensor]:
    """float64 log E, E ~ Exp(1), for each row's two rounds: [rows, blocks] for the blocks and
    [rows, RACE_BLOCK] for the tokens of the block that wins; row i's from the Philox stream
    keyed by keys[i] (its first `blocks` values, then the next RACE_BLOCK).

    In float64, and never below the smallest normal double: numpy's float32 exponentials are
    exactly 0 about once in 10 million, and log 0 = -inf made that token win whatever its
    probability (a filtered token too: -inf - -inf is NaN, which argmax takes as the most).
    Racing one float32 draw per token of a 49k vocabulary, 18 of 4,000 positions drew a token
    of probability e^-100."""
    noise = np.empty((len(keys), blocks + RACE_BLOCK))
    for row, key in enumerate(keys.tolist()):
        stream = np.random.Generator(np.random.Philox(key=key))
        stream.standard_exponential(out=noise[row])
    np.maximum(noise, _TINY, out=noise)
    logged = torch.from_numpy(noise).log_()
    return logged[:, :blocks], logged[:, blocks:]


def exponential_race(log_weights: Tensor, keys: npt.NDArray[np.uint64]) -> Tensor:
    """Row i's token, drawn with probability softmax(log_weights[i]) exactly, in two rounds of
    the race argmax(log w - log E): the blocks of RACE_BLOCK token ids race with their total
    weights (logsumexp), then the tokens of the winning block race with their own. A token
    wins with probability (its block's share) * (its share within the block). A -inf
    (filtered) token never wins, nor does a block of them. Two short races draw a few hundred
    exponentials a row instead of one per token of the vocabulary, whose noise alone took
    0.45 ms a 49k-token row on a 2-core CPU, most of a step's sampling."""
    rows, vocab = log_weights.shape
    blocks = -(-vocab // RACE_BLOCK)
    padded = torch.nn.functional.pad(
        log_weights, (0, blocks * RACE_BLOCK - vocab), value=float("-inf")
    ).view(rows, blocks, RACE_BLOCK)
    block_noise, token_noise = race_noise(keys, blocks)
    device = log_weights.device
    block = (padded.logsumexp(dim=-1) - block_noise.to(device)).argmax(dim=-1)
    within = padded[torch.arange(rows, device=device), block]
    token = (within - token_noise.to(device)).argmax(dim=-1)
    return block * RACE_BLOCK + token


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
            token_ids = token_ids[: _accepted(token_ids.tolist(), draft) + 1]
    else:
        processed = processed_logits(logits, params)
        keys = position_keys(seed, sample_index, first_position + np.arange(len(processed)))
        if draft is None:
            token_ids = exponential_race(processed, keys)
        else:
            raced = _race_along(processed, keys, draft)
            token_ids = torch.tensor(raced, dtype=torch.long, device=logits.device)
            processed = processed[: len(raced)]
    logits = logits[: len(token_ids)]
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


def _race_along(processed: Tensor, keys: npt.NDArray[np.uint64], draft: Sequence[int]) -> list[int]:
    """The race's tokens of the rows up to the first that differs from the draft's (or the row
    after the draft), raced in chunks of 1, 2, 4, ... rows: a few calls where drafts are
    rejected early, without racing the rows after the rejection."""
    tokens: list[int] = []
    start, size = 0, 1
    while start < len(processed):
        stop = min(start + size, len(processed))
        tokens += exponential_race(processed[start:stop], keys[start:stop]).tolist()
        drawn = _accepted(tokens, draft) + 1
        if drawn <= len(tokens):
            return tokens[:drawn]
        start, size = stop, 2 * size
    return tokens


def _accepted(token_ids: Sequence[int], draft: Sequence[int]) -> int:
    """How many leading draft tokens equal the drawn ones."""
    accepted = 0
    while accepted < min(len(draft), len(token_ids)) and draft[accepted] == token_ids[accepted]:
        accepted += 1
    return accepted
