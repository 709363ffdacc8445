"""Pure-Python suffix trie with the same API as the native SuffixTree: the test oracle.

Every substring of length 1..max_depth of every stored sequence is a node whose count is its
number of occurrences. Nothing is compressed, so memory is O(tokens * max_depth): use it for
tests and small trees only. The native core stores the same counts in a path-compressed tree.
"""

from __future__ import annotations

import heapq
import math

from drafter.draft import (
    Draft,
    Tokens,
    as_token_array,
    check_max_depth,
    check_spec_factor,
    check_speculate_args,
    match_limit,
)

# Rough CPython footprint of one trie node (object, slots, dict entry in its parent).
_NODE_BYTES = 200


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.count = 0  # occurrences of the path string from the root to this node
        self.children: dict[int, _Node] = {}

    def sorted_children(self) -> list[tuple[int, _Node]]:
        """Children by count descending, then token id ascending: the drafting order."""
        return sorted(self.children.items(), key=lambda item: (-item[1].count, item[0]))


class ReferenceSuffixTree:
    def __init__(self, max_depth: int = 64) -> None:
        check_max_depth(max_depth)
        self.max_depth = max_depth
        self._root = _Node()
        self._seqs: dict[int, list[int]] = {}
        # Per sequence, the nodes of its suffixes of length 0..max_depth-1 (index = length).
        self._active: dict[int, list[_Node]] = {}
        self._num_nodes = 0

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def extend(self, seq_id: int, tokens: Tokens) -> None:
        array = as_token_array(tokens)
        seq = self._seqs.setdefault(seq_id, [])
        active = self._active.setdefault(seq_id, [self._root])
        for token in array.tolist():
            seq.append(token)
            grown = [self._root]
            for node in active:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                    self._num_nodes += 1
                child.count += 1
                grown.append(child)
            active = grown[: self.max_depth]
        self._active[seq_id] = active

    def remove(self, seq_id: int) -> None:
        if seq_id not in self._seqs:
            raise KeyError(seq_id)
        seq = self._seqs.pop(seq_id)
        del self._active[seq_id]
        for start in range(len(seq)):
            node = self._root
            for token in seq[start : start + self.max_depth]:
                child = node.children[token]
                child.count -= 1
                if child.count == 0:
                    # Descendants count no more than their ancestor: the whole branch is empty.
                    self._num_nodes -= _subtree_size(child)
                    del node.children[token]
                    break
                node = child

    def count(self, tokens: Tokens) -> int:
        """Occurrences of tokens (length 1..max_depth) in the stored sequences."""
        node = self._find(as_token_array(tokens).tolist())
        return 0 if node is None else node.count

    def speculate(
        self, context: Tokens, max_tokens: int, min_prob: float = 0.1, tree: bool = False
    ) -> Draft:
        check_speculate_args(max_tokens, min_prob)
        ctx = as_token_array(context).tolist()
        if max_tokens == 0 or not ctx:
            return Draft()
        # The longest context suffix that occurs followed by at least one token. (A suffix
        # that occurs only at a sequence's end, e.g. the context itself in a request's own
        # tree, has nothing to draft.) Monotone in the length, so the native core bisects.
        for match_len in range(match_limit(len(ctx), self.max_depth, max_tokens), 0, -1):
            node = self._find(ctx[-match_len:])
            if node is not None and node.children:
                break
        else:
            return Draft()
        if tree:
            tokens, parents, probs = self._grow_tree(node, match_len, max_tokens, min_prob)
        else:
            tokens, parents, probs = self._grow_chain(node, match_len, max_tokens, min_prob)
        score = 0.0
        for prob in probs:  # left to right, as the native core sums
            score += prob
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
        """Suffix decoding's rule: every context suffix of length m that occurs in the tree
        drafts at most min(max_tokens, floor(spec_factor * m + spec_offset)) tokens (never
        deeper than max_depth); the best-scoring draft wins, the longer match on a tie."""
        check_speculate_args(max_tokens, min_prob)
        check_spec_factor(spec_factor, spec_offset)
        ctx = as_token_array(context).tolist()
        best = Draft()
        found = False
        for match_len in range(1, min(len(ctx), self.max_depth - 1) + 1):
            if max_tokens == 0:
                break
            node = self._find(ctx[-match_len:])
            if node is None:  # no longer suffix occurs either
                break
            cap = math.floor(spec_factor * match_len + spec_offset + 1e-9)
            budget = min(max_tokens, max(0, cap))
            if tree:
                tokens, parents, probs = self._grow_tree(node, match_len, budget, min_prob)
            else:
                tokens, parents, probs = self._grow_chain(node, match_len, budget, min_prob)
            score = 0.0
            for prob in probs:
                score += prob
            if not found or score >= best.score:
                best, found = Draft(tokens, parents, probs, score, match_len), True
        return best if best.token_ids else Draft()

    def num_tokens(self) -> int:
        return sum(len(seq) for seq in self._seqs.values())

    def num_nodes(self) -> int:
        return self._num_nodes

    def memory_bytes(self) -> int:
        """An estimate: nodes times a typical CPython node footprint, plus the sequences."""
        return self._num_nodes * _NODE_BYTES + 8 * self.num_tokens()

    def _find(self, tokens: list[int]) -> _Node | None:
        node = self._root
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                return None
            node = child
        return node

    def _grow_chain(
        self, node: _Node, depth: int, max_tokens: int, min_prob: float
    ) -> tuple[list[int], list[int], list[float]]:
        tokens: list[int] = []
        probs: list[float] = []
        prob = 1.0
        while len(tokens) < max_tokens and depth < self.max_depth and node.children:
            token, child = node.sorted_children()[0]
            prob = prob * (child.count / node.count)
            if prob < min_prob:
                break
            tokens.append(token)
            probs.append(prob)
            node, depth = child, depth + 1
        return tokens, list(range(-1, len(tokens) - 1)), probs

    def _grow_tree(
        self, root: _Node, depth: int, max_tokens: int, min_prob: float
    ) -> tuple[list[int], list[int], list[float]]:
        """Best-first: always add the candidate of highest path probability; ties go to the
        candidate pushed first (children are pushed in drafting order)."""
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        heap: list[tuple[float, int, int, _Node, int, int]] = []
        pushed = 0

        def push_children(node: _Node, prob: float, index: int, node_depth: int) -> None:
            nonlocal pushed
            if node_depth >= self.max_depth:
                return
            for token, child in node.sorted_children():
                child_prob = prob * (child.count / node.count)
                if child_prob < min_prob:
                    break  # the rest have smaller counts
                heapq.heappush(heap, (-child_prob, pushed, token, child, index, node_depth + 1))
                pushed += 1

        push_children(root, 1.0, -1, depth)
        while heap and len(tokens) < max_tokens:
            neg_prob, _, token, child, parent, child_depth = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            probs.append(-neg_prob)
            push_children(child, -neg_prob, len(tokens) - 1, child_depth)
        return tokens, parents, probs


def _subtree_size(node: _Node) -> int:
    return 1 + sum(_subtree_size(child) for child in node.children.values())
