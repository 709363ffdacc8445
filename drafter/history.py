"""RolloutHistory: the DAS drafting state.

Per prompt group, one suffix tree over the group's recent rollouts (the last `window` policy
versions, at most `max_rollouts_per_group` of them) and, with `live_siblings`, the outputs so far
of the group's running requests (GRPO samples of one prompt decode together: a sibling's first
tokens often predict another's next ones); per live request, one tree over its own prompt and
output so far. A draft for a request is the better-scoring of the two trees' drafts; with
`other_groups`, where both have nothing (a request that went past where its group's text
matches), one more tree over the stored rollouts of every group drafts instead (common phrasing
another prompt's rollouts share). A running request's sequence in the group tree grows as it
accepts tokens and leaves when it stops; a finished one comes back as a rollout (add_rollout).

Each draft says where it came from (Draft.source, source_of): HISTORY if the matched context
followed by the draft's first token occurs in a stored rollout; else SIBLINGS if it occurs in
running requests' outputs more often than in the request's own prompt and output (so another
request holds it); else CONTEXT (OTHER_GROUPS: from the tree of every group's rollouts). To
tell them apart, a group with live siblings keeps a second tree holding only its running
requests' sequences; it is never drafted from (one pooled tree drafts better than two:
replaying a T = 0.7 SmolLM2 trace, drafting from separate trees lost all of the live siblings'
gain).

Each stored rollout is its output preceded by the last max_depth prompt tokens, so a request
that has generated nothing yet already matches the prompt's end and drafts the group's most
frequent opening. Not thread-safe: one engine loop owns it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter
from typing import Protocol, cast

import numpy as np

from drafter.config import DrafterConfig
from drafter.draft import (
    CONTEXT,
    HISTORY,
    OTHER_GROUPS,
    SIBLINGS,
    Draft,
    Tokens,
    as_token_array,
)
from drafter.suffix_tree import (
    BatchRow,
    ExtendRow,
    SuffixTree,
    batch_row,
    extend_batch,
    extend_row,
    speculate_batch,
)


class TokenTree(Protocol):
    """What the history needs of a suffix tree (SuffixTree and ReferenceSuffixTree)."""

    def extend(self, seq_id: int, tokens: Tokens) -> None: ...
    def remove(self, seq_id: int) -> None: ...
    def speculate(
        self, context: Tokens, max_tokens: int, min_prob: float = 0.1, tree: bool = False
    ) -> Draft: ...
    def count(self, tokens: Tokens) -> int: ...
    def num_tokens(self) -> int: ...
    def memory_bytes(self) -> int: ...


TreeFactory = Callable[[int], TokenTree]
_BATCH_ROW = attrgetter("batch_row")


@dataclass(frozen=True, slots=True)
class GroupStats:
    group: str
    rollouts: int
    tokens: int  # output tokens of the stored rollouts
    mean_length: float
    p50_length: float
    p90_length: float
    max_length: int


def length_stats(group: str, lengths: Sequence[int]) -> GroupStats:
    """Statistics of a group's rollout output lengths."""
    if not lengths:
        return GroupStats(group, 0, 0, 0.0, 0.0, 0.0, 0)
    array = np.asarray(lengths, dtype=np.float64)
    p50, p90 = np.quantile(array, [0.5, 0.9])
    return GroupStats(
        group=group,
        rollouts=len(lengths),
        tokens=int(array.sum()),
        mean_length=float(array.mean()),
        p50_length=float(p50),
        p90_length=float(p90),
        max_length=max(lengths),
    )


@dataclass(slots=True)
class _Rollout:
    seq_id: int  # its sequence in the group tree
    version: int  # policy version that produced it
    length: int  # output tokens


@dataclass(slots=True)
class _Group:
    tree: TokenTree  # the stored rollouts and (live_siblings) the running requests' outputs
    siblings: TokenTree | None  # live_siblings: the running requests' sequences only, else None
    rollouts: deque[_Rollout] = field(default_factory=deque)  # oldest first
    live: int = 0  # running requests


@dataclass(slots=True)
class _Request:
    group: str
    tree: TokenTree  # the request's prompt and output, as sequence 0
    context: list[int]  # its latest tokens; at most 2 * max_depth are kept
    live_seq: int = -1  # its output so far in the group's trees (-1: live_siblings off)
    batch_row: BatchRow | None = None  # native trees: its row of speculate_batch
    extend_row: ExtendRow | None = None  # native trees: its row of extend_batch


def grow_context(context: list[int], tokens: list[int], max_depth: int) -> None:
    """A request's latest tokens grow by `tokens`; past 2 * max_depth only the last max_depth
    stay (a draft reads at most max_depth)."""
    context += tokens
    if len(context) > 2 * max_depth:
        del context[:-max_depth]


def extend_rows(
    rows: Sequence[ExtendRow],
    contexts: Sequence[list[int]],
    tokens: Sequence[list[int]],
    max_depth: int,
    threads: int = 1,
) -> None:
    """A step's tokens into every row's native trees in one call (suffix_tree.extend_batch,
    on `threads` threads), then into each row's context (grow_context)."""
    if not len(rows) == len(contexts) == len(tokens):
        raise ValueError("need one list of tokens per request")
    extend_batch(rows, tokens, threads)
    for context, row_tokens in zip(contexts, tokens, strict=True):
        grow_context(context, row_tokens, max_depth)


def source_of(
    draft: Draft,
    context: Sequence[int],
    own: TokenTree,
    group: TokenTree,
    siblings: TokenTree | None,
) -> str:
    """Where a non-empty draft of the group tree came from (the module docstring); siblings
    holds the group tree's running requests' sequences (None: not tracked, HISTORY)."""
    if siblings is None:
        return HISTORY
    key = [*context[len(context) - draft.match_len :], draft.token_ids[0]]
    live = siblings.count(key)
    if live < group.count(key):
        return HISTORY
    return SIBLINGS if live > own.count(key) else CONTEXT


class RolloutHistory:
    def __init__(
        self,
        config: DrafterConfig | None = None,
        tree_factory: TreeFactory = SuffixTree,
    ) -> None:
        self.config = config or DrafterConfig()
        self._new_tree = tree_factory
        self._groups: dict[str, _Group] = {}
        # other_groups: every group's stored rollouts, under the same sequence ids as in
        # their group's tree (a rollout leaves both together).
        self._all_rollouts = (
            tree_factory(self.config.max_depth) if self.config.other_groups else None
        )
        self._requests: dict[Hashable, _Request] = {}
        self._next_seq_id = 0
        self._version = 0
        self.evicted_groups = 0  # groups dropped as least recently used (config.max_groups)

    @property
    def version(self) -> int:
        return self._version

    # -- finished rollouts --------------------------------------------------------------

    def add_rollout(self, group: str, output: Tokens, version: int, prompt: Tokens = ()) -> bool:
        """Record a finished rollout; False (and nothing stored) if it is older than the window."""
        if version < self._oldest_kept_version():
            return False
        tokens = as_token_array(output)
        bridge = as_token_array(prompt)[-self.config.max_depth :]
        state = self._group(group)
        seq_id = self._new_seq_id()
        sequence = np.concatenate([bridge, tokens])
        state.tree.extend(seq_id, sequence)
        if self._all_rollouts is not None:
            self._all_rollouts.extend(seq_id, sequence)
        state.rollouts.append(_Rollout(seq_id, version, len(tokens)))
        while len(state.rollouts) > self.config.max_rollouts_per_group:
            self._forget(state, state.rollouts.popleft())
        return True

    def set_version(self, version: int) -> int:
        """Move to a new policy version and evict rollouts that fell out of the window.
        Returns the number of rollouts evicted."""
        if version < self._version:
            raise ValueError(f"policy version must not go back: {version} < {self._version}")
        self._version = version
        return self.evict_before(self._oldest_kept_version())

    def evict_before(self, version: int) -> int:
        """Forget every rollout produced by a policy version older than `version`."""
        evicted = 0
        for group in list(self._groups):
            state = self._groups[group]
            kept: deque[_Rollout] = deque()
            for rollout in state.rollouts:
                if rollout.version < version:
                    self._forget(state, rollout)
                    evicted += 1
                else:
                    kept.append(rollout)
            state.rollouts = kept
            if not kept and not state.live:
                del self._groups[group]
        return evicted

    def recent_lengths(self, group: str) -> list[int]:
        """Output lengths of the group's stored rollouts, oldest first ([] if unknown)."""
        state = self._groups.get(group)
        return [] if state is None else [rollout.length for rollout in state.rollouts]

    def group_stats(self, group: str) -> GroupStats:
        return length_stats(group, self.recent_lengths(group))

    def groups(self) -> list[str]:
        """The groups that hold stored rollouts."""
        return [group for group, state in self._groups.items() if state.rollouts]

    # -- live requests ------------------------------------------------------------------

    def start_request(self, request_id: Hashable, group: str, prompt: Tokens) -> None:
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already active")
        tokens = as_token_array(prompt)
        tree = self._new_tree(self.config.max_depth)
        tree.extend(0, tokens)
        request = _Request(group, tree, tokens.tolist())
        state = self._group(group)
        if state.siblings is not None:  # its output will follow the prompt's tail there
            request.live_seq = self._new_seq_id()
            tail = tokens[-self.config.max_depth :]
            state.tree.extend(request.live_seq, tail)
            state.siblings.extend(request.live_seq, tail)
        if self._new_tree is SuffixTree:
            # The group's trees outlive the request (a group with a running request is kept).
            # With live siblings its output so far is in them, after the prompt's tail: its
            # context's suffixes need no walk there.
            request.batch_row = batch_row(
                cast(SuffixTree, tree),
                cast(SuffixTree, state.tree),
                cast(SuffixTree | None, state.siblings),
                request.live_seq,
                cast(SuffixTree | None, self._all_rollouts),
            )
            targets = [(cast(SuffixTree, tree), 0)]
            if state.siblings is not None:
                targets.append((cast(SuffixTree, state.tree), request.live_seq))
                targets.append((cast(SuffixTree, state.siblings), request.live_seq))
            request.extend_row = extend_row(*targets)
        state.live += 1
        self._requests[request_id] = request

    def extend_request(self, request_id: Hashable, tokens: Tokens) -> None:
        request = self._requests[request_id]
        array = as_token_array(tokens)
        request.tree.extend(0, array)
        if request.live_seq >= 0:
            state = self._groups[request.group]
            state.tree.extend(request.live_seq, array)
            cast(TokenTree, state.siblings).extend(request.live_seq, array)
        grow_context(request.context, array.tolist(), self.config.max_depth)

    def extend_batch(self, request_ids: Sequence[Hashable], tokens: Sequence[list[int]]) -> None:
        """extend_request for every row (tokens[i]: a list of ints), the native trees of all
        rows grown in one call (extend_rows); one by one with other trees."""
        if self._new_tree is not SuffixTree:
            for request_id, row in zip(request_ids, tokens, strict=True):
                self.extend_request(request_id, row)
            return
        requests = [self._requests[request_id] for request_id in request_ids]
        rows = [cast(ExtendRow, request.extend_row) for request in requests]
        contexts = [request.context for request in requests]
        extend_rows(rows, contexts, tokens, self.config.max_depth, self.config.extend_threads)

    def stop_request(self, request_id: Hashable) -> None:
        """The request left: its output so far leaves its group's trees too (a finished one
        returns through add_rollout)."""
        request = self._requests.pop(request_id)
        state = self._groups[request.group]
        if request.live_seq >= 0:
            state.tree.remove(request.live_seq)
            cast(TokenTree, state.siblings).remove(request.live_seq)
        state.live -= 1
        if not state.live and not state.rollouts:
            del self._groups[request.group]

    def speculate(self, request_id: Hashable, max_tokens: int) -> Draft:
        """The better-scoring draft of the group's tree and the request's own context (the
        group's on a tie), with its source; where both are empty, every group's rollouts'
        (other_groups)."""
        request = self._requests[request_id]
        if max_tokens == 0:
            return Draft()
        context = request.context[-self.config.max_depth :]
        min_prob, as_tree = self.config.min_prob, self.config.tree_drafts
        own = request.tree.speculate(context, max_tokens, min_prob, as_tree)
        state = self._groups[request.group]
        shared = state.tree.speculate(context, max_tokens, min_prob, as_tree)
        if not (own.token_ids or shared.token_ids) and self._all_rollouts is not None:
            draft = self._all_rollouts.speculate(context, max_tokens, min_prob, as_tree)
            return draft.sourced(OTHER_GROUPS)
        if shared.score < own.score or not shared.token_ids:
            return own.sourced(CONTEXT)
        return shared.sourced(source_of(shared, context, request.tree, state.tree, state.siblings))

    def speculate_batch(
        self, request_ids: Sequence[Hashable], max_tokens: Sequence[int]
    ) -> list[Draft]:
        """speculate for every row, in one native call (no Python loop per row, the GIL
        released while it drafts) when the trees are native; equal to the per-row calls."""
        if self._new_tree is not SuffixTree:
            return [self.speculate(r, m) for r, m in zip(request_ids, max_tokens, strict=True)]
        requests = map(self._requests.__getitem__, request_ids)
        cfg = self.config
        return speculate_batch(
            cast(list[BatchRow], list(map(_BATCH_ROW, requests))),
            max_tokens,
            cfg.max_depth,
            cfg.min_prob,
            cfg.tree_drafts,
        )

    def active_requests(self) -> int:
        return len(self._requests)

    # -- accounting ---------------------------------------------------------------------

    def num_tokens(self) -> int:
        """Tokens held in all trees (rollouts with their prompt bridges, live requests)."""
        return sum(tree.num_tokens() for tree in self._trees())

    def memory_bytes(self) -> int:
        return sum(tree.memory_bytes() for tree in self._trees())

    def _trees(self) -> list[TokenTree]:
        groups = self._groups.values()
        siblings = [g.siblings for g in groups if g.siblings is not None]
        every_group = [] if self._all_rollouts is None else [self._all_rollouts]
        requests = [r.tree for r in self._requests.values()]
        return [g.tree for g in groups] + siblings + every_group + requests

    def _group(self, group: str) -> _Group:
        """The group's state, now the most recently used (a new one may push out the least
        recently used group that has no running request, past config.max_groups)."""
        groups = self._groups
        state = groups.pop(group, None)
        if state is None:
            if len(groups) >= self.config.max_groups:
                self._evict_least_recent(len(groups) - self.config.max_groups + 1)
            depth = self.config.max_depth
            siblings = self._new_tree(depth) if self.config.live_siblings else None
            state = _Group(self._new_tree(depth), siblings)
        groups[group] = state  # dicts keep insertion order: the last is the most recent
        return state

    def _evict_least_recent(self, count: int) -> None:
        # From the least recently used on, stopping at `count`: no walk over every group.
        idle = list(islice((g for g, state in self._groups.items() if not state.live), count))
        for group in idle:
            state = self._groups.pop(group)
            if self._all_rollouts is not None:
                for rollout in state.rollouts:
                    self._all_rollouts.remove(rollout.seq_id)
        self.evicted_groups += len(idle)

    def _forget(self, state: _Group, rollout: _Rollout) -> None:
        """A stored rollout leaves its group's tree and the tree of every group's."""
        state.tree.remove(rollout.seq_id)
        if self._all_rollouts is not None:
            self._all_rollouts.remove(rollout.seq_id)

    def _new_seq_id(self) -> int:
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        return seq_id

    def _oldest_kept_version(self) -> int:
        return self._version - self.config.window + 1
