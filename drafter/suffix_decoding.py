"""The peer as a policy: suffix decoding (ArcticInference) as vLLM configures it by default.

Written from its public description (the SuffixDecoding paper, arXiv 2411.04975, ArcticInference's
docs and its cache's documented API, vLLM's speculative-config defaults), not from its code:
- one global cache of responses, across every prompt and group, that grows while they decode: a
  request's output tokens enter it as they are accepted and stay after it ends (aborted ones
  too), the oldest response evicted first past max_cached_requests; prompts never enter it;
- per live request, a tree over its own prompt and output so far;
- a draft after the request's last max_depth tokens, from each tree: every context suffix of
  length m that occurs there drafts the most frequent continuation, at most
  min(max_spec_tokens, floor(spec_factor * m + spec_offset)) tokens while the path's estimated
  probability stays >= min_prob; the best-scoring draft wins (the longer match on a tie), and
  of the two trees' drafts the higher score (the request's own on a tie);
- no budget policy: every request asks for max_spec_tokens at every step.
The defaults are vLLM's (suffix_decoding_max_tree_depth 24, max_cached_requests 10000,
max_spec_factor 1.0, min_token_prob 0.1) with num_speculative_tokens 16, as bench/vllm_rollout.py
runs it. Not thread-safe: one engine loop owns it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from drafter.acceptance import check_step
from drafter.cost import CostModel
from drafter.draft import CONTEXT, HISTORY, Draft, Tokens, as_token_array, check_max_depth
from drafter.history import TokenTree, extend_rows, grow_context
from drafter.lengths import check_length
from drafter.policy import RequestView
from drafter.suffix_tree import (
    BatchRow,
    ExtendRow,
    SuffixTree,
    batch_row,
    extend_row,
    speculate_batch,
)


class CappedTree(TokenTree, Protocol):
    """What the cache needs of a suffix tree (SuffixTree and ReferenceSuffixTree)."""

    def __contains__(self, seq_id: int) -> bool: ...
    def speculate_capped(
        self,
        context: Tokens,
        max_tokens: int,
        min_prob: float = 0.1,
        tree: bool = False,
        spec_factor: float = 1.0,
        spec_offset: float = 0.0,
    ) -> Draft: ...


@dataclass(frozen=True, slots=True)
class SuffixDecodingConfig:
    max_depth: int = 24  # tree depth: longest stored substring (match + draft); the context
    max_spec_tokens: int = 16  # most draft tokens per request per step
    spec_factor: float = 1.0  # a draft after an m-token match has <= spec_factor * m + offset
    spec_offset: float = 0.0
    min_prob: float = 0.1  # a draft path stops once its estimated probability falls below
    max_cached_requests: int = 10_000  # responses kept in the global cache (oldest go first)
    tree_drafts: bool = False  # vLLM drafts chains

    def __post_init__(self) -> None:
        check_max_depth(self.max_depth)
        if self.max_spec_tokens < 1:
            raise ValueError(f"max_spec_tokens must be >= 1, got {self.max_spec_tokens}")
        if not (math.isfinite(self.spec_factor) and self.spec_factor > 0.0):
            raise ValueError(f"spec_factor must be > 0, got {self.spec_factor}")
        if not math.isfinite(self.spec_offset):
            raise ValueError(f"spec_offset must be finite, got {self.spec_offset}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob}")
        if self.max_cached_requests < 1:
            raise ValueError(f"max_cached_requests must be >= 1, got {self.max_cached_requests}")


@dataclass(slots=True)
class _Request:
    tree: CappedTree  # its prompt and output, as sequence 0
    context: list[int]  # its latest tokens; at most 2 * max_depth are kept
    batch_row: BatchRow | None = None  # native trees: its row of speculate_batch
    extend_row: ExtendRow | None = None  # native trees: its row of extend_batch (own, global)


class SuffixDecodingCache:
    """The global response cache and the per-request trees (module docstring). It serves the
    speculation core the way RolloutHistory does (start/extend/stop a request, speculate)."""

    def __init__(
        self,
        config: SuffixDecodingConfig | None = None,
        tree_factory: Callable[[int], CappedTree] = SuffixTree,
    ) -> None:
        self.config = config or SuffixDecodingConfig()
        self._new_tree = tree_factory
        self._global = tree_factory(self.config.max_depth)
        # Cached responses, oldest first: request id -> its sequence in the global tree.
        self._responses: OrderedDict[Hashable, int] = OrderedDict()
        self._requests: dict[Hashable, _Request] = {}
        self._next_seq_id = 0

    def start_request(self, request_id: Hashable, group: str, prompt: Tokens) -> None:
        """A request starts (its group plays no part: the cache is global). A cached response
        under the same id is replaced."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already active")
        tokens = as_token_array(prompt)
        tree = self._new_tree(self.config.max_depth)
        tree.extend(0, tokens)
        request = _Request(tree, tokens[-2 * self.config.max_depth :].tolist())
        if self._new_tree is SuffixTree:
            request.batch_row = batch_row(cast(SuffixTree, tree), cast(SuffixTree, self._global))
            request.extend_row = extend_row(
                (cast(SuffixTree, tree), 0), (cast(SuffixTree, self._global), self._next_seq_id)
            )
        self._requests[request_id] = request
        old = self._responses.pop(request_id, None)
        if old is not None and old in self._global:  # one with no token was never stored
            self._global.remove(old)
        self._responses[request_id] = self._next_seq_id
        self._next_seq_id += 1
        while len(self._responses) > self.config.max_cached_requests:
            _, seq_id = self._responses.popitem(last=False)
            if seq_id in self._global:  # a response with no token yet was never stored
                self._global.remove(seq_id)

    def extend_request(self, request_id: Hashable, tokens: Tokens) -> None:
        request = self._requests[request_id]
        array = as_token_array(tokens)
        request.tree.extend(0, array)
        seq_id = self._responses.get(request_id)
        if seq_id is not None and array.size:  # it may have been evicted while running
            self._global.extend(seq_id, array)
        grow_context(request.context, array.tolist(), self.config.max_depth)

    def extend_batch(self, request_ids: Sequence[Hashable], tokens: Sequence[list[int]]) -> None:
        """extend_request for every row (tokens[i]: a list of ints), the native trees of all
        rows grown in one call (extend_rows); one by one with other trees."""
        if self._new_tree is not SuffixTree:
            for request_id, row in zip(request_ids, tokens, strict=True):
                self.extend_request(request_id, row)
            return
        requests = [self._requests[request_id] for request_id in request_ids]
        # Without its response (evicted while it runs) only its own tree grows.
        rows = [
            cast(ExtendRow, request.extend_row)[: 4 if request_id in self._responses else 2]
            for request_id, request in zip(request_ids, requests, strict=True)
        ]
        contexts = [request.context for request in requests]
        extend_rows(rows, contexts, tokens, self.config.max_depth)

    def stop_request(self, request_id: Hashable) -> None:
        """The request left; its response stays cached."""
        del self._requests[request_id]

    def speculate(self, request_id: Hashable, max_tokens: int) -> Draft:
        request = self._requests[request_id]
        if max_tokens == 0:
            return Draft()
        cfg = self.config
        context = request.context[-cfg.max_depth :]
        own, cached = (
            tree.speculate_capped(
                context, max_tokens, cfg.min_prob, cfg.tree_drafts, cfg.spec_factor, cfg.spec_offset
            )
            for tree in (request.tree, self._global)
        )
        return cached.sourced(HISTORY) if cached.score > own.score else own.sourced(CONTEXT)

    def speculate_batch(
        self, request_ids: Sequence[Hashable], max_tokens: Sequence[int]
    ) -> list[Draft]:
        """speculate for every row, in one native call when the trees are native."""
        if self._new_tree is not SuffixTree:
            return [self.speculate(r, m) for r, m in zip(request_ids, max_tokens, strict=True)]
        cfg = self.config
        return speculate_batch(
            [cast(BatchRow, self._requests[r].batch_row) for r in request_ids],
            max_tokens,
            cfg.max_depth,
            cfg.min_prob,
            cfg.tree_drafts,
            spec_factor=cfg.spec_factor,
            spec_offset=cfg.spec_offset,
            own_wins_ties=True,
        )

    def active_requests(self) -> int:
        return len(self._requests)

    def cached_responses(self) -> int:
        return len(self._responses)

    def num_tokens(self) -> int:
        """Tokens in the global cache and the live requests' trees."""
        return self._global.num_tokens() + sum(r.tree.num_tokens() for r in self._requests.values())

    def memory_bytes(self) -> int:
        return self._global.memory_bytes() + sum(
            r.tree.memory_bytes() for r in self._requests.values()
        )


class SuffixPolicy:
    """Suffix decoding's budget: max_spec_tokens for every request at every step; its drafts
    come from its own cache (the speculation core drafts from `cache`, not the history)."""

    name = "suffix"
    drafts = True
    cost = None
    predicts_lengths = False

    def __init__(self, config: SuffixDecodingConfig | None = None) -> None:
        self.config = config or SuffixDecodingConfig()
        self.cache = SuffixDecodingCache(self.config)

    def request(self, group: str) -> RequestView:
        return RequestView(group)

    def budgets(self, requests: Sequence[RequestView]) -> list[int]:
        return [self.config.max_spec_tokens] * len(requests)

    def reprice(self, cost: CostModel) -> None:
        pass  # it prices nothing

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        check_step(drafted, accepted)

    def observe_finished(self, group: str, length: int) -> None:
        check_length(length)
