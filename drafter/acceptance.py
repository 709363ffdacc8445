"""Acceptance: how many draft tokens verification accepts, modelled and estimated online.

Two estimates, one per budget rule (drafter/budgets.py):
- the saturating model A(p) = k * l * (1 - exp(-alpha * p / l)) of DESIGN.md, fitted per group
  from (drafted, accepted) counts of verify steps pooled by draft length (the closed form);
- the per-token continuation rate of chain drafts (the marginal rule): the chance that a draft
  token is accepted given that the one before it was.
Both decay old evidence per verify step and start from a prior worth a few steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


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
    that the one before it was, with the prior worth prior_weight tried positions."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self._decay = decay
        self._tried = 0.0
        self._accepted = 0.0

    def observe(self, drafted: int, accepted: int) -> None:
        check_step(drafted, accepted)
        if drafted == 0:
            return
        self._tried = self._tried * self._decay + min(accepted + 1, drafted)
        self._accepted = self._accepted * self._decay + accepted

    def rate(self, prior: float, prior_weight: float) -> float:
        return (self._accepted + prior * prior_weight) / (self._tried + prior_weight)


def check_step(drafted: int, accepted: int) -> None:
    if not 0 <= accepted <= drafted:
        raise ValueError(f"need 0 <= accepted <= drafted, got {accepted}, {drafted}")
