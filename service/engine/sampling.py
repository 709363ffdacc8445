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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from service.engine import _kernels
from service.worker import SamplingParams

LogprobsMode = Literal["raw", "processed"]


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


def position_keys(
    seed: npt.ArrayLike, sample_index: npt.ArrayLike, positions: npt.ArrayLike
) -> npt.NDArray[np.uint64]:
    """One 64-bit key per position, a pure function of (seed, sample_index, position); seed and
    sample_index (each in [0, 2**64)) are one for all positions or one per position."""
    key = splitmix64(np.asarray(seed, dtype=np.uint64))
    key = splitmix64(key ^ np.asarray(sample_index, dtype=np.uint64))
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


def exponential_race(
    log_weights: Tensor,
    keys: npt.NDArray[np.uint64],
    rows: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Row i's token, drawn with probability softmax(scale * log_weights[rows[i]]) exactly
    (rows: a long tensor, default every row; keys: one per drawn row), in two rounds of the
    race argmax(log w - log E): the blocks of RACE_BLOCK token ids race with their total
    weights (block_logsumexp), then the tokens of the winning block race with their own. A
    token wins with probability (its block's share) * (its share within the block). A -inf
    (filtered) token never wins, nor does a block of them. Two short races draw a few hundred
    exponentials a row instead of one per token of the vocabulary, whose noise alone took
    0.45 ms a 49k-token row on a 2-core CPU, most of a step's sampling."""
    device = log_weights.device
    if rows is None:
        rows = torch.arange(len(log_weights), device=device)
    vocab = log_weights.shape[1]
    weights = block_logsumexp(log_weights, RACE_BLOCK, rows, scale)
    block_noise, token_noise = race_noise(keys, weights.shape[1])
    block = (weights - block_noise.to(device)).argmax(dim=-1)
    # The winning block's tokens, the ids past the vocabulary (a last, partial block) filtered.
    ids = block[:, None] * RACE_BLOCK + torch.arange(RACE_BLOCK, device=device)
    within = log_weights[rows[:, None], ids.clamp(max=vocab - 1)].float() * scale
    within = within.masked_fill(ids >= vocab, -math.inf)
    token = (within - token_noise.to(device)).argmax(dim=-1)
    return block * RACE_BLOCK + token


def block_logsumexp(
    x: Tensor, block: int, rows: Tensor | None = None, scale: float = 1.0
) -> Tensor:
    """float32 [len(rows), ceil(vocab / block)]: the log-sum-exp of each block of `block`
    consecutive columns of scale * x[rows] (x [rows, vocab]; rows a long tensor, default
    every row; the last block partial), -inf for a block of -inf only. On a CPU with AVX2 the
    engine's native kernel, which reads the rows where they are (24-38 us a 49k-token row in
    256-token blocks on a 2-core CPU, against torch's 83-190), else torch. Each row's values
    are its own alone. The kernel runs on the calling thread: handing half a step's rows to
    the kernels' helper thread right after torch's own threads made a call 5 ms slower."""
    vocab = x.shape[1]
    blocks = -(-vocab // block)
    if x.device.type == "cpu" and x.dtype == torch.float32 and _kernels.available():
        index = torch.arange(len(x)) if rows is None else rows
        out = torch.empty(len(index), blocks)
        _kernels.block_logsumexp(x.contiguous(), index.contiguous(), scale, out, block, 1)
        return out
    taken = (x if rows is None else x[rows]).float() * scale
    padded = torch.nn.functional.pad(taken, (0, blocks * block - vocab), value=-math.inf)
    return padded.view(len(taken), blocks, block).logsumexp(dim=-1)


def processed_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """float32 [rows, vocab]: the logits of the distribution sampled from (its softmax):
    temperature, then top-k, then top-p (the smallest set of most likely tokens whose mass
    reaches top_p; ties at the boundary are kept); filtered tokens are -inf."""
    scaled = logits.float()
    if params.temperature != 1.0:  # times 1 / T, as the race scales unfiltered rows in place
        scaled = scaled * (1.0 / params.temperature)
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


@dataclass(frozen=True, slots=True)
class Span:
    """One sample's rows of a verify step's logits, to draw tokens from: `rows` rows from row
    `start`, predicting its positions first_position, first_position + 1, ...; `draft`: the
    tokens drafted at those positions (drawing stops at the first row whose token differs from
    the draft's, or the row after the draft), None: draw every row."""

    start: int
    rows: int
    params: SamplingParams
    seed: int
    sample_index: int
    first_position: int
    draft: Sequence[int] | None = None


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
    span = Span(0, len(logits), params, seed, sample_index, first_position, draft)
    return sample_spans(logits, [span], logprobs_mode)[0]


def sample_spans(
    logits: Tensor, spans: Sequence[Span], logprobs_mode: LogprobsMode = "raw"
) -> list[Sampled]:
    """sample() for each span of one forward's logits, all spans' rows in a few calls: a
    step's samples share each vocabulary-sized operation instead of one call each (a call's
    fixed cost was most of a one-row sample() on a 2-core CPU). Each row's draw and logprobs
    are a function of that row alone, whatever the other spans.

    Drafted rows are drawn in rounds of 1, 2, 4, ... rows a span, every span still agreeing
    with its draft in the same round, so rows after a rejection are not raced."""
    drawn: list[list[int]] = [[] for _ in spans]
    greedy = [i for i, span in enumerate(spans) if span.params.temperature == 0.0]
    if greedy:
        tokens = logits[_index(logits, spans, greedy, None)].argmax(dim=-1).tolist()
        at = 0
        for i in greedy:
            span = spans[i]
            drawn[i] = tokens[at : at + span.rows]
            at += span.rows
            if span.draft is not None:
                drawn[i] = drawn[i][: _accepted(drawn[i], span.draft) + 1]
    racing = [i for i, span in enumerate(spans) if span.params.temperature > 0.0]
    size = 1
    while racing:
        for members in _by_processing(spans, racing).values():
            counts = []
            for i in members:  # a span without a draft draws all its rows at once
                span = spans[i]
                left = span.rows - len(drawn[i])
                counts.append(left if span.draft is None else min(size, left))
            index = _index(logits, spans, members, counts, [len(drawn[i]) for i in members])
            keys = position_keys(
                np.repeat([spans[i].seed for i in members], counts),
                np.repeat([spans[i].sample_index for i in members], counts),
                np.concatenate(
                    [
                        spans[i].first_position + len(drawn[i]) + np.arange(count)
                        for i, count in zip(members, counts, strict=True)
                    ]
                ),
            )
            params = spans[members[0]].params
            if _filters(params, logits.shape[1]):
                tokens = exponential_race(processed_logits(logits[index], params), keys).tolist()
            else:  # the rows raced where they are, scaled by 1 / temperature
                tokens = exponential_race(logits, keys, index, 1.0 / params.temperature).tolist()
            at = 0
            for i, count in zip(members, counts, strict=True):
                drawn[i] += tokens[at : at + count]
                at += count
        still = []
        for i in racing:
            draft = spans[i].draft
            if draft is not None:
                kept = _accepted(drawn[i], draft) + 1
                if kept <= len(drawn[i]):
                    drawn[i] = drawn[i][:kept]
                elif len(drawn[i]) < spans[i].rows:
                    still.append(i)
        racing, size = still, 2 * size
    return _with_logprobs(logits, spans, drawn, logprobs_mode)


def _index(
    logits: Tensor,
    spans: Sequence[Span],
    members: Sequence[int],
    counts: Sequence[int] | None,
    skip: Sequence[int] | None = None,
) -> Tensor:
    """The indices of these spans' logits rows, in order: counts[j] rows of span members[j]
    after its first skip[j] (default: all its rows)."""
    index: list[int] = []
    for j, i in enumerate(members):
        first = spans[i].start + (0 if skip is None else skip[j])
        index += range(first, first + (spans[i].rows if counts is None else counts[j]))
    return torch.tensor(index, dtype=torch.long, device=logits.device)


def _filters(params: SamplingParams, vocab: int) -> bool:
    """True if processed_logits filters tokens (top-k or top-p), not only scales them."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


# What processed_logits does to a row: temperature, top_k, top_p.
_Processing = tuple[float, int, float]


def _processing(params: SamplingParams) -> _Processing:
    return params.temperature, params.top_k, params.top_p


def _by_processing(spans: Sequence[Span], members: Sequence[int]) -> dict[_Processing, list[int]]:
    """The spans grouped by what processed_logits does to their rows."""
    groups: dict[_Processing, list[int]] = {}
    for i in members:
        groups.setdefault(_processing(spans[i].params), []).append(i)
    return groups


def _with_logprobs(
    logits: Tensor, spans: Sequence[Span], drawn: Sequence[list[int]], mode: LogprobsMode
) -> list[Sampled]:
    """Each span's drawn tokens with their logprobs (and top logprobs where its params ask):
    raw, of the logits' softmax; processed, of the distribution sampled from (greedy: a point
    mass). A logprob is the token's logit less its row's log-sum-exp (block_logsumexp), a
    row's top logprobs from its log_softmax."""
    counts = [len(tokens) for tokens in drawn]
    groups: dict[tuple[_Processing | None, bool], list[int]] = {}
    for i, span in enumerate(spans):
        # Raw logprobs do not depend on the params.
        processing = None if mode == "raw" else _processing(span.params)
        groups.setdefault((processing, span.params.top_logprobs > 0), []).append(i)
    chosen: list[list[float]] = [[] for _ in spans]
    tops: list[list[dict[int, float]] | None] = [None] * len(spans)
    vocab = logits.shape[1]
    for (processing, top), group in groups.items():
        index = _index(logits, spans, group, [counts[i] for i in group])
        token_ids = torch.tensor(
            [t for i in group for t in drawn[i]], dtype=torch.long, device=logits.device
        )[:, None]
        params = spans[group[0]].params
        # The distribution: the logits rows where they are, times `scale` (raw: 1), or made
        # (a greedy point mass; filtered rows).
        dist, rows, scale = logits, index, 1.0
        if processing is not None and processing[0] == 0.0:
            dist = torch.full((len(index), vocab), -math.inf, device=logits.device)
            dist.scatter_(-1, token_ids, 0.0)
            rows = torch.arange(len(index), device=logits.device)
        elif processing is not None and _filters(params, vocab):
            dist = processed_logits(logits[index], params)
            rows = torch.arange(len(index), device=logits.device)
        elif processing is not None:
            scale = 1.0 / params.temperature
        if top:
            logprobs = (dist[rows].float() * scale).log_softmax(dim=-1)
            values = logprobs.gather(-1, token_ids)[:, 0].tolist()
        else:
            normaliser = block_logsumexp(dist, RACE_BLOCK, rows, scale).logsumexp(dim=-1)
            picked = dist[rows[:, None], token_ids][:, 0].float() * scale
            values = (picked - normaliser).tolist()
        at = 0
        for i in group:
            chosen[i] = values[at : at + counts[i]]
            if top:
                k = min(spans[i].params.top_logprobs, logprobs.shape[-1])
                top_values, top_ids = logprobs[at : at + counts[i]].topk(k, dim=-1)
                pairs = zip(top_ids.tolist(), top_values.tolist(), strict=True)
                tops[i] = [dict(zip(ids, row, strict=True)) for ids, row in pairs]
            at += counts[i]
    return [
        Sampled(tokens, values, top)
        for tokens, values, top in zip(drawn, chosen, tops, strict=True)
    ]


def _accepted(token_ids: Sequence[int], draft: Sequence[int]) -> int:
    """How many leading draft tokens equal the drawn ones."""
    accepted = 0
    while accepted < min(len(draft), len(token_ids)) and draft[accepted] == token_ids[accepted]:
        accepted += 1
    return accepted
