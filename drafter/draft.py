"""The result of one speculation, and the argument checks shared by every tree."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import numpy.typing as npt

TokenArray = npt.NDArray[np.int32]
Tokens = Sequence[int] | npt.NDArray[np.integer]

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


# Where a draft came from: the prompt group's stored rollouts (under the suffix policy, suffix
# decoding's global cache), the outputs so far of the group's running requests (live
# siblings), the request's own prompt and output, or (where none of those has a match) the
# stored rollouts of every group.
HISTORY, SIBLINGS, CONTEXT, OTHER_GROUPS = "history", "siblings", "context", "other_groups"
DRAFT_SOURCES = (HISTORY, SIBLINGS, CONTEXT, OTHER_GROUPS)


@dataclass(frozen=True, slots=True)
class Draft:
    """A chain or tree of draft tokens proposed after a context.

    token_ids[i] is the i-th draft token; parents[i] is the index of its parent in this
    draft, -1 when it directly follows the context (a chain has parents [-1, 0, 1, ...]);
    a parent always comes before its children. probs[i] is the estimated probability that
    the path from the context to token i is accepted: the product of child count / parent
    count along it. score is the sum of probs (expected accepted tokens). match_len is the
    length of the context suffix the draft was grown from: the longest one that occurs in the
    tree followed by at least one token (0: no such suffix, empty draft). source names the
    tree it came from where a history chose among several (one of DRAFT_SOURCES), else "".
    """

    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    score: float = 0.0
    match_len: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.token_ids)

    def is_chain(self) -> bool:
        return all(parent == i - 1 for i, parent in enumerate(self.parents))

    def sourced(self, source: str) -> Draft:
        """This draft as coming from `source` (an empty draft comes from nowhere)."""
        return replace(self, source=source) if self.token_ids else self


# The empty draft, shared by every row that drafts nothing (a Draft is never changed after it
# is made).
NO_DRAFT = Draft()


def as_token_array(tokens: Tokens) -> TokenArray:
    """Tokens as a contiguous int32 array; ValueError for anything that is not one."""
    if (
        type(tokens) is np.ndarray
        and tokens.dtype == np.int32
        and tokens.ndim == 1
        and tokens.flags.c_contiguous
    ):
        return cast(TokenArray, tokens)  # already one (a tree's extend per row: keep it cheap)
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        return np.empty(0, dtype=np.int32)
    if array.dtype.kind not in "iu":  # signed or unsigned integers (not bool)
        raise ValueError(f"tokens must be integers, got dtype {array.dtype}")
    if array.dtype != np.int32:
        if int(array.min()) < _INT32_MIN or int(array.max()) > _INT32_MAX:
            raise ValueError("token ids must fit in int32")
        array = array.astype(np.int32)
    return np.ascontiguousarray(array)


def check_speculate_args(max_tokens: int, min_prob: float) -> None:
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if not 0.0 <= min_prob <= 1.0:
        raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")


def check_spec_factor(spec_factor: float, spec_offset: float) -> None:
    if not (math.isfinite(spec_factor) and spec_factor > 0.0):
        raise ValueError(f"spec_factor must be > 0, got {spec_factor}")
    if not math.isfinite(spec_offset):
        raise ValueError(f"spec_offset must be finite, got {spec_offset}")


def check_max_depth(max_depth: int) -> None:
    if max_depth < 2:
        raise ValueError(f"max_depth must be >= 2, got {max_depth}")


def match_limit(context_len: int, max_depth: int, max_tokens: int) -> int:
    """Longest context suffix worth matching: it must leave room in the depth-limited tree
    for max_tokens draft tokens below it (and is at least 1)."""
    return min(context_len, max(1, max_depth - max_tokens))
