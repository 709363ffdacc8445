"""Length prediction and the Short / Medium / Long classes of the DAS deployment.

Each request starts in the class most of its group's recent rollouts fell in, classes cut at
quantiles of all recent lengths, and moves up as its real length grows past a class bound or past
its group's predicted length. Its predicted remaining length is a high quantile of the group's
lengths that exceed what it has already generated.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt


class LengthClass(IntEnum):
    SHORT = 0
    MEDIUM = 1
    LONG = 2


@dataclass(frozen=True, slots=True)
class ClassBounds:
    """Lengths up to short_max are Short, up to medium_max Medium, longer ones Long."""

    short_max: float
    medium_max: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.short_max <= self.medium_max:
            raise ValueError(
                f"need 0 <= short_max <= medium_max, got {self.short_max}, {self.medium_max}"
            )

    def classify(self, length: float) -> LengthClass:
        if length <= self.short_max:
            return LengthClass.SHORT
        if length <= self.medium_max:
            return LengthClass.MEDIUM
        return LengthClass.LONG


def class_bounds(
    lengths: Sequence[int], short_quantile: float, long_quantile: float
) -> ClassBounds | None:
    """Class bounds at two quantiles of the workload's recent lengths (None without any)."""
    if not 0.0 < short_quantile <= long_quantile < 1.0:
        raise ValueError(
            f"need 0 < short_quantile <= long_quantile < 1, got {short_quantile}, {long_quantile}"
        )
    if not lengths:
        return None
    ordered = sorted(lengths)
    return ClassBounds(quantile(ordered, short_quantile), quantile(ordered, long_quantile))


def initial_class(group_lengths: Sequence[int], bounds: ClassBounds | None) -> LengthClass:
    """The class most of the group's recent rollouts fell in (ties go to the longer class, the
    one that matters for the makespan); Medium when nothing is known."""
    if bounds is None or not group_lengths:
        return LengthClass.MEDIUM
    votes = [0, 0, 0]
    for length in group_lengths:
        votes[bounds.classify(length)] += 1
    return LengthClass(max(range(3), key=lambda c: (votes[c], c)))


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly (numpy's default method)."""
    if not ordered:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def predict_length(
    group_lengths: Sequence[int],
    generated: int,
    length_quantile: float,
    prior_length: float,
    tail_growth: float,
) -> float:
    """Predicted total output length of a request that has generated `generated` tokens: the
    `length_quantile` of its group's recent lengths exceeding `generated` (the rollouts it can
    still resemble). Past every one of them, or with no history (then at least prior_length),
    it expects to run another tail_growth * generated tokens."""
    if generated < 0:
        raise ValueError(f"generated must be >= 0, got {generated}")
    ordered = sorted(group_lengths)
    survivors = ordered[bisect.bisect_right(ordered, generated) :]
    if survivors:
        return quantile(survivors, length_quantile)
    floor = prior_length if not group_lengths else 0.0
    return max(floor, (1.0 + tail_growth) * generated, generated + 1.0)


class LengthTable:
    """Every group's recent lengths, sorted, in one padded array, so that predict_length runs
    for a whole step's rows in a few numpy operations (hundreds of rows a step) instead of a
    Python call per row. Built from a snapshot of the groups' lengths: build another when they
    change."""

    def __init__(self, lengths: Mapping[str, Sequence[int]]) -> None:
        self._index = {group: i for i, group in enumerate(lengths)}
        widest = max((len(values) for values in lengths.values()), default=0)
        # One row per group and a last row for groups without lengths; +inf pads each row.
        self._sorted = np.full((len(lengths) + 1, max(widest, 1)), np.inf)
        self._counts = np.zeros(len(lengths) + 1, dtype=np.int64)
        for i, values in enumerate(lengths.values()):
            self._sorted[i, : len(values)] = sorted(values)
            self._counts[i] = len(values)

    def predict(
        self,
        groups: Sequence[str],
        generated: Sequence[int] | npt.NDArray[np.float64],
        length_quantile: float,
        prior_length: float,
        tail_growth: float,
    ) -> npt.NDArray[np.float64]:
        """predict_length of each row (its group and generated tokens), equal to the float."""
        rows = len(groups)
        missing = len(self._index)
        index = np.fromiter((self._index.get(g, missing) for g in groups), np.int64, rows)
        done = np.asarray(generated, dtype=np.float64)
        if rows and done.min() < 0:
            raise ValueError("generated must be >= 0")
        table = self._sorted[index]
        counts = self._counts[index]
        first = (table <= done[:, None]).sum(axis=1)  # bisect_right: the first survivor
        survivors = counts - first
        # quantile() over each row's survivors, in its float order.
        position = length_quantile * np.maximum(survivors - 1, 0)
        low = position.astype(np.int64)
        high = np.minimum(low + 1, np.maximum(survivors - 1, 0))
        width = table.shape[1]
        at_low = np.take_along_axis(table, np.minimum(first + low, width - 1)[:, None], 1)[:, 0]
        at_high = np.take_along_axis(table, np.minimum(first + high, width - 1)[:, None], 1)[:, 0]
        has = survivors > 0  # the others' at_low and at_high are the padding's inf
        at_low, at_high = np.where(has, at_low, 0.0), np.where(has, at_high, 0.0)
        quantiles = at_low + (at_high - at_low) * (position - low)
        floor = np.where(counts == 0, float(prior_length), 0.0)
        past_all = np.maximum(np.maximum(floor, (1.0 + tail_growth) * done), done + 1.0)
        return np.where(has, quantiles, past_all)


def current_class(
    initial: LengthClass,
    generated: int,
    group_lengths: Sequence[int],
    bounds: ClassBounds | None,
    length_quantile: float,
) -> LengthClass:
    """A request's class now: never below its initial class; at least the class of what it has
    already generated; one above its initial class once it outgrew its group's predicted
    length (the `length_quantile` of the group's recent lengths)."""
    cls = initial
    if bounds is not None:
        cls = max(cls, bounds.classify(generated))
    if group_lengths and generated > quantile(sorted(group_lengths), length_quantile):
        cls = max(cls, LengthClass(min(initial + 1, LengthClass.LONG)))
    return cls


@dataclass(frozen=True, slots=True)
class Prediction:
    length: float  # predicted total output length
    length_class: LengthClass


def check_length(length: int) -> None:
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
