"""SuffixTree: the native (C++) suffix tree behind the same API as ReferenceSuffixTree."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

from drafter import _core
from drafter.draft import (
    CONTEXT,
    HISTORY,
    SIBLINGS,
    Draft,
    Tokens,
    as_token_array,
    check_max_depth,
    check_spec_factor,
    check_speculate_args,
)

_CORE = attrgetter("_core")
# Draft.source by the native DraftSource (drafter/_native/batch.h): none, own, shared, siblings.
_SOURCE_NAMES = ("", CONTEXT, HISTORY, SIBLINGS)


class SuffixTree:
    """Frequency-counted suffix tree over many token sequences, depth-limited to max_depth.

    extend costs O(max_depth) per token (no rebuild); remove forgets a sequence (counts drop,
    emptied nodes are freed); speculate drafts the most frequent continuation of the longest
    suffix match of a context (see Draft). Drafts equal ReferenceSuffixTree's exactly.
    """

    def __init__(self, max_depth: int = 64) -> None:
        check_max_depth(max_depth)
        self.max_depth = max_depth
        self._core = _core.SuffixTreeCore(max_depth)

    def __contains__(self, seq_id: int) -> bool:
        return bool(self._core.contains(seq_id))

    def __len__(self) -> int:
        return int(self._core.num_sequences())

    def extend(self, seq_id: int, tokens: Tokens) -> None:
        self._core.extend(seq_id, as_token_array(tokens))

    def remove(self, seq_id: int) -> None:
        if not self._core.contains(seq_id):
            raise KeyError(seq_id)
        self._core.remove(seq_id)

    def count(self, tokens: Tokens) -> int:
        """Occurrences of tokens (length 1..max_depth) in the stored sequences."""
        return int(self._core.count(as_token_array(tokens)))

    def speculate(
        self, context: Tokens, max_tokens: int, min_prob: float = 0.1, tree: bool = False
    ) -> Draft:
        check_speculate_args(max_tokens, min_prob)
        tokens, parents, probs, score, match_len = self._core.speculate(
            as_token_array(context), max_tokens, min_prob, tree
        )
        return Draft(tokens, parents, probs, score, match_len)

    def speculate_capped(
        self,
        context: Tokens,
        max_tokens: int,
        min_prob: float = 0.1,
        tree: bool = False,
        spec_factor: float = 1.0,
        spec_offset: float = 0.0,
    ) -> Draft:
        """Suffix decoding's draft (ReferenceSuffixTree.speculate_capped, exactly)."""
        check_speculate_args(max_tokens, min_prob)
        check_spec_factor(spec_factor, spec_offset)
        tokens, parents, probs, score, match_len = self._core.speculate_capped(
            as_token_array(context), max_tokens, min_prob, tree, spec_factor, spec_offset
        )
        return Draft(tokens, parents, probs, score, match_len)

    def num_tokens(self) -> int:
        """Tokens in the stored (not removed) sequences."""
        return int(self._core.num_tokens())

    def num_nodes(self) -> int:
        return int(self._core.num_nodes())

    def memory_bytes(self) -> int:
        """Bytes held by the tree: node pool, child index, sequences (removed sequences
        still referenced by an edge included)."""
        return int(self._core.memory_bytes())

    def check_integrity(self) -> None:
        """Raise AssertionError if an internal invariant is broken (for tests)."""
        problem = self._core.check_integrity()
        if problem:
            raise AssertionError(problem)


def speculate_batch(
    own: Sequence[SuffixTree],
    shared: Sequence[SuffixTree | None],
    max_tokens: Sequence[int],
    context_len: int,
    min_prob: float = 0.1,
    tree: bool = False,
    *,
    siblings: Sequence[SuffixTree | None] | None = None,
    spec_factor: float = 0.0,
    spec_offset: float = 0.0,
    own_wins_ties: bool = False,
) -> list[Draft]:
    """Every row's draft in one native call, the GIL released while it drafts. Row i drafts
    after the last context_len tokens of own[i]'s sequence 0 (a request's prompt and output)
    from own[i] and shared[i] (None: own only) and keeps the better-scoring draft (a tie goes
    to shared unless own_wins_ties), at most max_tokens[i] tokens. Its source: CONTEXT (own);
    from shared, SIBLINGS if siblings[i] (a tree of some of shared[i]'s sequences: a group's
    running requests) counts its match followed by its first token as often as shared[i]
    does, else HISTORY; "" for an empty draft. spec_factor 0: speculate's longest match;
    > 0: speculate_capped's rule. Equal to those per-row calls; not safe while another
    thread changes one of the trees."""
    check_speculate_args(0, min_prob)
    if spec_factor != 0.0:
        check_spec_factor(spec_factor, spec_offset)
    return _core.speculate_batch(
        list(map(_CORE, own)),
        _cores(shared),
        [None] * len(own) if siblings is None else _cores(siblings),
        max_tokens,
        context_len,
        min_prob,
        tree,
        spec_factor,
        spec_offset,
        own_wins_ties,
        Draft,
        _SOURCE_NAMES,
    )


def _cores(trees: Sequence[SuffixTree | None]) -> list[_core.SuffixTreeCore | None]:
    return [None if tree is None else tree._core for tree in trees]
