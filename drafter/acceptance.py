"""Acceptance: how many draft tokens verification accepts, modelled and estimated online.

Three estimates, one per budget rule (drafter/budgets.py):
- the saturating model A(p) = k * l * (1 - exp(-alpha * p / l)) of DESIGN.md, fitted per group
  from (drafted, accepted) counts of verify steps pooled by draft length (the closed form);
- the per-token continuation rate of chain drafts (das-rate's rule): the chance that a draft
  token is accepted given that the one before it was;
- each draft token's own chance of acceptance from its evidence (das's rule, DraftCalibrator).
All decay old evidence per verify step and start from a prior worth a few steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from drafter import _core
from drafter.draft import DRAFT_SOURCES


@dataclass(frozen=True, slots=True)
class Acceptance:
    """A(p) = k * l * (1 - exp(-alpha * p / l)): accepted tokens of p drafted over l tokens."""

    k: float  # (0, 1]: the largest share of a request's tokens that drafts can supply
    alpha: float  # > 0 with k * alpha <= 1: how fast more drafting pays off

    def __post_init__(self) -> None:
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {self.k}")
        if not (math.isfinite(self.alpha) and self.alpha > 0.0):
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if self.k * self.alpha > 1.0 + 1e-9:
            raise ValueError(f"k * alpha must be <= 1, got {self.k} * {self.alpha}")

    def accepted(self, drafted: float, length: float) -> float:
        if drafted < 0 or length <= 0:
            raise ValueError(f"need drafted >= 0 and length > 0, got {drafted}, {length}")
        return self.k * length * -math.expm1(-self.alpha * drafted / length)


# Verify steps are pooled by how many tokens they drafted: bucket b holds draft lengths in
# [_BUCKET_STARTS[b], _BUCKET_STARTS[b + 1]).
_BUCKET_STARTS = (1, 2, 3, 5, 9, 17, 33)


def _bucket(drafted: int) -> int:
    for b in range(len(_BUCKET_STARTS) - 1, -1, -1):
        if drafted >= _BUCKET_STARTS[b]:
            return b
    raise ValueError(f"drafted must be >= 1, got {drafted}")


class AcceptanceEstimator:
    """Exponentially weighted (drafted, accepted) totals of verify steps, per draft length.

    A bucket whose steps drafted d tokens and accepted a per step on average is one point of
    the acceptance curve: draft density x = d / (a + 1) draft tokens per output token, accepted
    share f = a / (a + 1) of the output, and the model says f = k * (1 - exp(-alpha * x)).
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self._decay = decay
        self._drafted = np.zeros(len(_BUCKET_STARTS))
        self._accepted = np.zeros(len(_BUCKET_STARTS))
        self._steps = np.zeros(len(_BUCKET_STARTS))
        self.observations = 0  # steps seen, undecayed

    def observe(self, drafted: int, accepted: int) -> None:
        if not 0 <= accepted <= drafted:
            raise ValueError(f"need 0 <= accepted <= drafted, got {accepted}, {drafted}")
        if drafted == 0:
            return  # nothing was tried: no evidence either way
        if self._decay < 1.0:
            self._drafted *= self._decay
            self._accepted *= self._decay
            self._steps *= self._decay
        b = _bucket(drafted)
        self._drafted[b] += drafted
        self._accepted[b] += accepted
        self._steps[b] += 1.0
        self.observations += 1

    def points(self) -> tuple[list[float], list[float], list[float]]:
        """(draft densities, accepted shares, weights in steps) of the non-empty buckets."""
        used = self._steps > 1e-12
        outputs = self._accepted[used] + self._steps[used]
        density = self._drafted[used] / outputs
        share = self._accepted[used] / outputs
        return density.tolist(), share.tolist(), self._steps[used].tolist()


_ALPHA_RANGE = (0.01, 10.0, 72)  # the coarse log grid of alpha: from, to, points
_MIN_K = 1e-3
# The prior enters the fit as pseudo-observations of its own curve at these draft densities.
_PRIOR_DENSITIES = (0.25, 0.5, 1.0, 2.0, 4.0)


def fit_acceptance(
    density: Sequence[float],
    share: Sequence[float],
    weight: Sequence[float],
    prior: Acceptance,
    prior_weight: float,
) -> Acceptance:
    """Weighted least squares of share = k * (1 - exp(-alpha * density)) over (k, alpha) with
    k * alpha <= 1. The prior counts as prior_weight steps of evidence lying on its own curve,
    so with no data the fit is the prior and with much data the prior fades. For each alpha on
    a log grid the best k has a closed form; the best alpha is then refined on a finer grid."""
    if not len(density) == len(share) == len(weight):
        raise ValueError("density, share and weight must have the same length")
    if prior_weight <= 0:
        raise ValueError(f"prior_weight must be > 0, got {prior_weight}")
    pseudo_density = np.asarray(_PRIOR_DENSITIES)
    pseudo_share = prior.k * -np.expm1(-prior.alpha * pseudo_density)
    x = np.concatenate([np.asarray(density, dtype=np.float64), pseudo_density])
    f = np.concatenate([np.asarray(share, dtype=np.float64), pseudo_share])
    pseudo_weight = np.full(len(_PRIOR_DENSITIES), prior_weight / len(_PRIOR_DENSITIES))
    w = np.concatenate([np.asarray(weight, dtype=np.float64), pseudo_weight])

    def best(alphas: npt.NDArray[np.float64]) -> tuple[float, float]:
        g = -np.expm1(-np.outer(alphas, x))  # (alphas, points)
        k = (g @ (w * f)) / (g**2 @ w)
        k = np.clip(k, _MIN_K, np.minimum(1.0, 1.0 / alphas))  # the residual is convex in k
        residual = ((f[None, :] - k[:, None] * g) ** 2) @ w
        i = int(np.argmin(residual))
        return float(k[i]), float(alphas[i])

    low, high, points = _ALPHA_RANGE
    grid = np.geomspace(low, high, points)
    _, alpha = best(grid)
    step = float(grid[1] / grid[0])
    k, alpha = best(np.geomspace(alpha / step, alpha * step, 41))
    return Acceptance(k=k, alpha=min(alpha, 1.0 / k))


class ContinuationRate:
    """Exponentially weighted per-token acceptance of chain drafts: a verify step that drafted
    d tokens and accepted a of them tried min(a + 1, d) positions (the first rejection ends the
    chain) and a of those succeeded. rate() is the chance that a draft token is accepted given
    that the one before it was, with the prior worth prior_weight tried positions. The evidence
    decays by `decay` per verify step (`step`, a clock its owner advances once per step),
    drafted or not: a group whose drafts stopped paying drifts back to its prior and drafts
    again, so the rate never stops drafting for good (decayed per observation instead, a few
    rejected drafts could hold it under the price of a token forever)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self._decay = decay
        self._tried = 0.0
        self._accepted = 0.0
        self._step = 0  # the verify step the counts are as of

    def observe(self, drafted: int, accepted: int, step: int) -> None:
        check_step(drafted, accepted)
        if drafted == 0:
            return
        self._age(step)
        self._tried += min(accepted + 1, drafted)
        self._accepted += accepted

    def rate(self, prior: float, prior_weight: float, step: int) -> float:
        self._age(step)
        return (self._accepted + prior * prior_weight) / (self._tried + prior_weight)

    def _age(self, step: int) -> None:
        if step > self._step:
            factor = self._decay ** (step - self._step)
            self._tried *= factor
            self._accepted *= factor
            self._step = step


def check_step(drafted: int, accepted: int) -> None:
    if not 0 <= accepted <= drafted:
        raise ValueError(f"need 0 <= accepted <= drafted, got {accepted}, {drafted}")


# -- per-token acceptance from a draft's own evidence (das) -------------------------------

# A draft token's evidence, binned. Its path probability (the tree's product of child /
# parent counts from the context to it) falls in bin b when it is >= _PROB_EDGES[b] (and below
# the edge before); the last bin holds everything below 0.05.
_PROB_EDGES = (0.999, 0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.1, 0.05, 0.0)
_PROB_BINS = len(_PROB_EDGES)
# What a bin's tokens are expected to do before any evidence: its middle path probability.
_PROB_PRIORS = (1.0, 0.95, 0.825, 0.675, 0.525, 0.375, 0.25, 0.15, 0.075, 0.025)
_PROB_PRIORS_ARRAY = np.asarray(_PROB_PRIORS)
_POSITION_BINS = 5  # position i in the chain: 0, 1, 2-3, 4-7, 8+ (bit length, capped)
_MATCH_BINS = 7  # the draft's match length: 1, 2, 3-4, 5-8, 9-16, 17-32, 33+


def prob_bin(prob: float) -> int:
    """The bin of a path probability (module tables above)."""
    for b, edge in enumerate(_PROB_EDGES):
        if prob >= edge:
            return b
    return _PROB_BINS - 1


def position_bin(position: int) -> int:
    return min(_POSITION_BINS - 1, position.bit_length())


def match_bin(match_len: int) -> int:
    return min(_MATCH_BINS - 1, max(0, match_len - 1).bit_length())


# Draft.source's names (drafter.draft.DRAFT_SOURCES), in their bins; bin 0: none recorded.
_SOURCE_NAMES = ("", *DRAFT_SOURCES)
_SOURCE_BINS = len(_SOURCE_NAMES)
_SOURCE_INDEX = {name: b for b, name in enumerate(_SOURCE_NAMES)}


def source_bin(source: object) -> int:
    """A draft's source (Draft.source) as a bin: 0 for "" or anything unknown."""
    return _SOURCE_INDEX.get(source, 0) if isinstance(source, str) else 0


IntArray = npt.NDArray[np.int64]


def source_bins(sources: Sequence[object]) -> IntArray:
    """source_bin of each source, in one array."""
    return np.fromiter(map(source_bin, sources), np.int64, len(sources))


# The binning of DraftCalibrator.cell, as the native cut (drafter._core.cut_drafts) takes it.
CELL_BINNING = (np.asarray(_PROB_EDGES), _POSITION_BINS, _MATCH_BINS, _SOURCE_BINS)


@functools.cache
def _depth_bins(depths: int) -> IntArray:
    """The position bin of each depth 0, 1, ..., depths - 1: min(4, depth.bit_length()),
    how many of 1, 2, 4, 8 are <= depth."""
    return np.searchsorted(1 << np.arange(_POSITION_BINS - 1), np.arange(depths), side="right")


# observe_runs loops in Python up to this many tokens (numpy's fixed cost, about 15 us a call
# on a 2-core CPU, is more than the loop's).
_FEW_TOKENS = 16


class DraftCalibrator:
    """The chance that a draft token is accepted (it and every token before it in the chain),
    learned online from the draft's own evidence: its path probability, its position, the
    draft's match length and its source.

    Two levels of exponentially decayed (accepted, tried) counts, each shrunk toward the one
    above it by a prior worth a few tried tokens:
      coarse (path-probability bin, position bin) -> toward a prior: at the first position the
        bin's middle path probability, deeper the coarse estimate of the position bin before
        it times position_discount (so a deeper bin is tried once the one before it does well:
        on greedy traces drafts grow past any fixed depth);
      fine   (path-probability bin, position bin, match-length bin, source) -> toward coarse.
    Counts decay once per verify step (tick), whether or not anything was drafted, so a bin
    that stopped being drafted (its estimate fell below what pays) drifts back to its prior
    and is tried again: the estimate never stays at 0, and drafting never stops for good.
    `floor` bounds every estimate from below as well.
    """

    def __init__(
        self,
        decay: float,
        coarse_weight: float,
        fine_weight: float,
        floor: float,
        position_discount: float = 1.0,
    ) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if not (coarse_weight > 0.0 and fine_weight > 0.0):
            raise ValueError("prior weights must be > 0")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        if not 0.0 < position_discount <= 1.0:
            raise ValueError(f"position_discount must be in (0, 1], got {position_discount}")
        self.decay = decay
        self.coarse_weight = coarse_weight
        self.fine_weight = fine_weight
        self.floor = floor
        shape = (_PROB_BINS, _POSITION_BINS, _MATCH_BINS, _SOURCE_BINS)
        self._accepted = np.zeros(shape)
        self._tried = np.zeros(shape)
        self.position_discount = position_discount
        self._table: npt.NDArray[np.float64] | None = None  # estimates, until the next change
        self._best_by_position = np.ones(_POSITION_BINS)  # set with each new table

    def tick(self) -> None:
        """One verify step has passed: older evidence weighs `decay` times less."""
        if self.decay < 1.0:
            self._accepted *= self.decay
            self._tried *= self.decay
            self._table = None

    def cell(self, prob: float, position: int, match_len: int, source: object = None) -> int:
        """The flat table cell of a token at this depth of a draft with this match length."""
        b = (prob_bin(prob) * _POSITION_BINS + position_bin(position)) * _MATCH_BINS
        return (b + match_bin(match_len)) * _SOURCE_BINS + source_bin(source)

    def cells(self, probs: Sequence[float], match_len: int, source: object = None) -> list[int]:
        """The cell of each token of a chain with these path probabilities."""
        return [self.cell(p, i, match_len, source) for i, p in enumerate(probs)]

    def table(self) -> npt.NDArray[np.float64]:
        """Every cell's estimate, flat (index with cells()): in one native call
        (drafter/_native/pricing.cc, equal to the numpy formula to the bit: each (probability,
        position) bin's coarse estimate, (accepted + coarse_weight * prior) / (tried +
        coarse_weight) over the bin's summed counts, with the prior as the class docstring
        says; each cell's, (accepted + fine_weight * coarse) / (tried + fine_weight), at least
        floor)."""
        if self._table is None:
            self._table, self._best_by_position = _core.calibration_table(
                self._accepted.reshape(-1),
                self._tried.reshape(-1),
                self._tried.shape,
                _PROB_PRIORS_ARRAY,
                self.coarse_weight,
                self.fine_weight,
                self.position_discount,
                self.floor,
            )
        return self._table

    def depth_ceilings(self, depths: int) -> npt.NDArray[np.float64]:
        """The most any draft token at depth 0, 1, ..., depths - 1 can be given as its chance
        with its ancestors' (the running minimum along its path, capped at 1): the best cell
        of each depth's position bin, minimised over the depths above it. Non-increasing."""
        self.table()  # and with it each position bin's best cell, capped at 1
        return np.minimum.accumulate(self._best_by_position[_depth_bins(depths)])

    def evidence(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Every cell's decayed (accepted, tried) counts, flat (index with cells()); views."""
        return self._accepted.reshape(-1), self._tried.reshape(-1)

    def observe(self, cells: Sequence[int], accepted: int) -> None:
        """A chain drafted with these cells was verified and its first `accepted` tokens kept:
        those were accepted, the rest were not (each token of it is one tried token)."""
        if not 0 <= accepted <= len(cells):
            raise ValueError(f"need 0 <= accepted <= {len(cells)}, got {accepted}")
        self.observe_outcomes(cells, [i < accepted for i in range(len(cells))])

    def observe_runs(
        self,
        cells: Sequence[int],
        starts: Sequence[int],
        lengths: Sequence[int],
        accepted: Sequence[int],
    ) -> None:
        """Many verified chains at once, each cells[starts[i] : starts[i] + lengths[i]] with
        its first accepted[i] tokens kept: observe() of each in turn, in one numpy pass (each
        cell's counts grow in the same order, so to the same floats)."""
        if not len(starts) == len(lengths) == len(accepted):
            raise ValueError("need a start, length and accepted count per chain")
        if any(not 0 <= hit <= size for size, hit in zip(lengths, accepted, strict=True)):
            raise ValueError("need 0 <= accepted <= length for every chain")
        total = sum(lengths)
        if total <= _FEW_TOKENS:  # numpy's fixed cost would outweigh the loop
            for start, size, hit in zip(starts, lengths, accepted, strict=True):
                self.observe(cells[start : start + size], hit)
            return
        sizes = np.asarray(lengths, dtype=np.int64)
        hits = np.asarray(accepted, dtype=np.int64)
        offsets = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        tried = np.asarray(cells, dtype=np.int64)[np.repeat(starts, sizes) + offsets]
        np.add.at(self._tried.reshape(-1), tried, 1.0)
        np.add.at(self._accepted.reshape(-1), tried[offsets < np.repeat(hits, sizes)], 1.0)
        self._table = None

    def observe_outcomes(self, cells: Sequence[int], accepted: Sequence[bool]) -> None:
        """Verified draft tokens (chain or tree nodes) with these cells, and whether each was
        accepted (a tree node: whether it lies on the accepted path)."""
        if len(accepted) != len(cells):
            raise ValueError("need one outcome per cell")
        if not cells:
            return
        flat_tried = self._tried.reshape(-1)
        flat_accepted = self._accepted.reshape(-1)
        for cell, hit in zip(cells, accepted, strict=True):
            flat_tried[cell] += 1.0
            if hit:
                flat_accepted[cell] += 1.0
        self._table = None
