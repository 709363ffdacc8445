"""SuffixTree: the native (C++) suffix tree behind the same API as ReferenceSuffixTree."""

from __future__ import annotations

from collections.abc import Sequence

from drafter import _core
from drafter.draft import (
    CONTEXT,
    HISTORY,
    OTHER_GROUPS,
    SIBLINGS,
    Draft,
    Tokens,
    as_token_array,
    check_max_depth,
    check_spec_factor,
    check_speculate_args,
)

# Draft.source by the native DraftSource (drafter/_native/batch.h): none, own, shared, siblings,
# fallback.
_SOURCE_NAMES = ("", CONTEXT, HISTORY, SIBLINGS, OTHER_GROUPS)


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


# One row of speculate_batch (batch_row makes it): the native cores of a request's own tree,
# of the shared tree it also drafts from and of that tree's siblings tree, shared_seq, and the
# core of its fallback tree.
_Core = _core.SuffixTreeCore
BatchRow = tuple[_Core, _Core | None, _Core | None, int, _Core | None]


def batch_row(
    own: SuffixTree,
    shared: SuffixTree | None = None,
    siblings: SuffixTree | None = None,
    shared_seq: int = -1,
    fallback: SuffixTree | None = None,
) -> BatchRow:
    """A row of speculate_batch. It drafts after the last context_len tokens of own's sequence
    0 (a request's prompt and output) from own and shared (None: own only); siblings (a tree
    of some of shared's sequences: a group's running requests) only tells where a draft of
    shared came from. shared_seq >= 0: a live sequence of shared (and of siblings) that ends
    with the row's context (the request's own output with live siblings), whose suffixes'
    nodes the trees already keep, so the context is not walked from the root there.
    fallback (None: none) is drafted from only where own and shared both give nothing.
    A row holds the trees' native cores, so it can be kept while they live."""
    return (
        own._core,
        None if shared is None else shared._core,
        None if siblings is None else siblings._core,
        shared_seq,
        None if fallback is None else fallback._core,
    )


def speculate_batch(
    rows: Sequence[BatchRow],
    max_tokens: Sequence[int],
    context_len: int,
    min_prob: float = 0.1,
    tree: bool = False,
    *,
    spec_factor: float = 0.0,
    spec_offset: float = 0.0,
    own_wins_ties: bool = False,
) -> list[Draft]:
    """Every row's draft (batch_row) in one native call, the GIL released while it drafts.
    A row keeps the better-scoring of its own and its shared tree's drafts (a tie goes to
    shared unless own_wins_ties), at most max_tokens[i] tokens, or its fallback tree's where
    both are empty. Its source: CONTEXT (own); from shared, SIBLINGS if the row's siblings
    tree counts its match followed by its first token as often as shared does, else HISTORY;
    OTHER_GROUPS from the fallback; "" for an empty draft. spec_factor 0:
    speculate's longest match; > 0: speculate_capped's rule. ValueError for a row whose own
    tree lacks sequence 0 or whose shared_seq is not live in its trees or does not end with
    its context. Equal to those per-row calls; not safe while another thread changes one of
    the trees."""
    check_speculate_args(0, min_prob)
    if spec_factor != 0.0:
        check_spec_factor(spec_factor, spec_offset)
    return _core.speculate_batch(
        rows,
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


# One row of extend_batch: (tree, seq_id, tree, seq_id, ...), the sequences that grow by the
# same tokens (a request's own tree and, with live siblings, its group's trees).
ExtendRow = tuple[_Core | int, ...]


def extend_row(*targets: tuple[SuffixTree, int]) -> ExtendRow:
    """A row of extend_batch: the (tree, seq_id) pairs that grow by the row's tokens."""
    if not targets or any(seq_id < 0 for _, seq_id in targets):
        raise ValueError("need at least one (tree, seq_id) with seq_id >= 0")
    return tuple(item for tree, seq_id in targets for item in (tree._core, seq_id))


def extend_batch(
    rows: Sequence[ExtendRow], tokens: Sequence[Sequence[int]], threads: int = 1
) -> None:
    """Row i's tokens appended to each of its sequences (extend_row), for every row in one
    native call, the trees growing with the GIL released; equal to the extend() calls one by
    one. An empty row of tokens changes nothing (no sequence is created). ValueError, before
    any tree changes, for a token that is not an int32 integer.

    Distinct trees grow on `threads` threads (at most 8; each tree on one of them, its
    sequences in row order): 1, the calling thread; 0, one per CPU this process may run on,
    once the step appends 256 tokens or more in all (below that, starting a thread costs more
    than it saves). 1.2-1.8x faster on two idle cores here, but no faster, or up to 15%
    slower, right after torch's CPU ops, as a CPU engine records a step (README, "Trees grown
    on threads")."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    _core.extend_batch(rows, tokens, threads)
