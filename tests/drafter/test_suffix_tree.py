"""Property tests of the native SuffixTree against the Python ReferenceSuffixTree and against
brute-force counting over the stored sequences."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from drafter import Draft, ReferenceSuffixTree, SuffixTree
from drafter.draft import Tokens, match_limit

MIN_PROBS = [0.0, 0.1, 0.3, 1.0]


# ------------------------------------------------------------------------------------------
# Brute force over the stored sequences


def brute_count(seqs: list[list[int]], s: list[int]) -> int:
    """Occurrences of s as a contiguous substring of the sequences."""
    n = len(s)
    return sum(seq[i : i + n] == s for seq in seqs for i in range(len(seq) - n + 1))


def brute_continuations(seqs: list[list[int]], s: list[int]) -> dict[int, int]:
    """Token -> occurrences of s followed by that token."""
    found: dict[int, int] = {}
    n = len(s)
    for seq in seqs:
        for i in range(len(seq) - n):
            if seq[i : i + n] == s:
                found[seq[i + n]] = found.get(seq[i + n], 0) + 1
    return found


def brute_match_len(seqs: list[list[int]], context: list[int], limit: int) -> int:
    """Longest context suffix (at most limit) that occurs followed by a token."""
    for m in range(min(limit, len(context)), 0, -1):
        if brute_continuations(seqs, context[-m:]):
            return m
    return 0


def brute_chain(
    seqs: list[list[int]], context: list[int], max_depth: int, max_tokens: int, min_prob: float
) -> Draft:
    """The greedy most-frequent continuation, from counts alone."""
    if max_tokens == 0 or not context:
        return Draft()
    match_len = brute_match_len(seqs, context, match_limit(len(context), max_depth, max_tokens))
    if match_len == 0:
        return Draft()
    path = context[-match_len:]
    tokens: list[int] = []
    probs: list[float] = []
    prob = 1.0
    while len(tokens) < max_tokens and len(path) < max_depth:
        follow = brute_continuations(seqs, path)
        if not follow:
            break
        token = min(follow, key=lambda t: (-follow[t], t))
        prob = prob * (follow[token] / brute_count(seqs, path))
        if prob < min_prob:
            break
        tokens.append(token)
        probs.append(prob)
        path = [*path, token]
    score = 0.0
    for p in probs:
        score += p
    return Draft(tokens, list(range(-1, len(tokens) - 1)), probs, score, match_len)


# ------------------------------------------------------------------------------------------
# Comparing the two trees


class Pair:
    """A native tree and a reference tree fed the same operations, plus the sequences."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.native = SuffixTree(max_depth)
        self.reference = ReferenceSuffixTree(max_depth)
        self.seqs: dict[int, list[int]] = {}

    def extend(self, seq_id: int, tokens: Tokens) -> None:
        self.native.extend(seq_id, tokens)
        self.reference.extend(seq_id, tokens)
        self.seqs.setdefault(seq_id, []).extend(int(t) for t in tokens)

    def remove(self, seq_id: int) -> None:
        self.native.remove(seq_id)
        self.reference.remove(seq_id)
        del self.seqs[seq_id]

    def check_structure(self) -> None:
        self.native.check_integrity()
        assert self.native.num_tokens() == self.reference.num_tokens()
        assert self.native.num_tokens() == sum(len(s) for s in self.seqs.values())
        assert len(self.native) == len(self.reference) == len(self.seqs)
        for seq_id in self.seqs:
            assert seq_id in self.native
        if not self.seqs or not any(self.seqs.values()):
            assert self.native.num_nodes() == 0

    def check_count(self, s: list[int]) -> None:
        assert self.native.count(s) == self.reference.count(s), s

    def check_speculate(
        self, context: list[int], max_tokens: int, min_prob: float, tree: bool
    ) -> None:
        native = self.native.speculate(context, max_tokens, min_prob, tree)
        reference = self.reference.speculate(context, max_tokens, min_prob, tree)
        assert native == reference, (context, max_tokens, min_prob, tree)


def random_probes(pair: Pair, rng: random.Random, vocab: int, num: int) -> None:
    """Counts and drafts for strings and contexts taken from the sequences and made up."""
    stored = [s for s in pair.seqs.values() if s]
    for _ in range(num):
        if stored and rng.random() < 0.6:
            seq = rng.choice(stored)
            end = rng.randint(0, len(seq))
            context = seq[max(0, end - rng.randint(0, pair.max_depth + 4)) : end]
        else:
            context = [rng.randrange(vocab) for _ in range(rng.randint(0, pair.max_depth + 2))]
        if 1 <= len(context) <= pair.max_depth:
            pair.check_count(context)
        max_tokens = rng.randint(0, 20)
        min_prob = rng.choice(MIN_PROBS)
        pair.check_speculate(context, max_tokens, min_prob, tree=False)
        pair.check_speculate(context, max_tokens, min_prob, tree=True)


# ------------------------------------------------------------------------------------------
# Stateful: random interleaved extends and removes, compared after every operation


class TreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(2)
        self.vocab = 2

    @initialize(max_depth=st.sampled_from([2, 3, 4, 5, 8, 64]), vocab=st.integers(2, 5))
    def start(self, max_depth: int, vocab: int) -> None:
        self.pair = Pair(max_depth)
        self.vocab = vocab

    @rule(seq_id=st.integers(0, 5), data=st.data())
    def extend(self, seq_id: int, data: st.DataObject) -> None:
        tokens = data.draw(st.lists(st.integers(0, self.vocab - 1), max_size=14))
        self.pair.extend(seq_id, tokens)

    @precondition(lambda self: bool(self.pair.seqs))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        self.pair.remove(data.draw(st.sampled_from(sorted(self.pair.seqs))))

    @rule(data=st.data())
    def probe(self, data: st.DataObject) -> None:
        stored = [s for s in self.pair.seqs.values() if s]
        token = st.integers(0, self.vocab - 1)
        from_sequence = data.draw(st.booleans())
        if stored and from_sequence:
            seq = data.draw(st.sampled_from(stored))
            end = data.draw(st.integers(0, len(seq)))
            context = seq[max(0, end - data.draw(st.integers(0, 70))) : end]
        else:
            context = data.draw(st.lists(token, max_size=self.pair.max_depth + 3))
        max_tokens = data.draw(st.integers(0, 20))
        min_prob = data.draw(st.sampled_from(MIN_PROBS))
        tree = data.draw(st.booleans())
        self.pair.check_speculate(context, max_tokens, min_prob, tree)

    @invariant()
    def agrees(self) -> None:
        self.pair.check_structure()
        random_probes(self.pair, random.Random(self.pair.native.num_tokens()), self.vocab, 3)


TreeMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_native_tree_matches_reference = pytest.mark.slow(TreeMachine.TestCase)


# ------------------------------------------------------------------------------------------
# Seeded soaks: longer sequences, deeper trees, wide vocabularies


def soak(seed: int, max_depth: int, vocab: int, ops: int, max_len: int, skew: float) -> None:
    """Random extends (new and existing ids), removes and re-adds, checked after each."""
    rng = random.Random(seed)
    pair = Pair(max_depth)

    def token() -> int:
        # skew > 0: geometric-ish, so a few tokens dominate and fan-outs stay uneven
        return min(int(rng.expovariate(skew)), vocab - 1) if skew else rng.randrange(vocab)

    for _ in range(ops):
        if pair.seqs and rng.random() < 0.3:
            pair.remove(rng.choice(sorted(pair.seqs)))
        else:
            seq_id = rng.randrange(8)
            pair.extend(seq_id, [token() for _ in range(rng.randint(0, max_len))])
        pair.check_structure()
        random_probes(pair, rng, vocab, 8)
    for seq_id in sorted(pair.seqs):
        pair.remove(seq_id)
        pair.check_structure()
    assert pair.native.num_nodes() == 0


@pytest.mark.parametrize(
    ("max_depth", "vocab"), [(64, 3), (64, 5), (8, 3), (8, 4), (16, 2), (3, 5)]
)
def test_soak_dense(max_depth: int, vocab: int) -> None:
    soak(seed=max_depth * 10 + vocab, max_depth=max_depth, vocab=vocab, ops=40, max_len=120, skew=0)


@pytest.mark.slow
@pytest.mark.parametrize(("max_depth", "seed"), [(64, 1), (6, 2), (3, 3), (12, 4)])
def test_soak_wide_vocabulary(max_depth: int, seed: int) -> None:
    """Fan-outs beyond the child index and leaders thresholds (8 and 32 children), with
    removes that reorder and drop the most frequent children."""
    soak(seed=seed, max_depth=max_depth, vocab=70, ops=40, max_len=400, skew=0.08)


# ------------------------------------------------------------------------------------------
# Brute force


sequences = st.lists(st.lists(st.integers(0, 2), max_size=25), min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(
    seqs=sequences,
    max_depth=st.sampled_from([2, 3, 5, 8, 64]),
    context=st.lists(st.integers(0, 2), max_size=12),
    max_tokens=st.integers(0, 12),
    min_prob=st.sampled_from(MIN_PROBS),
)
def test_chain_is_the_greedy_most_frequent_continuation(
    seqs: list[list[int]], max_depth: int, context: list[int], max_tokens: int, min_prob: float
) -> None:
    tree = SuffixTree(max_depth)
    for seq_id, seq in enumerate(seqs):
        tree.extend(seq_id, seq)
    draft = tree.speculate(context, max_tokens, min_prob)
    assert draft == brute_chain(seqs, context, max_depth, max_tokens, min_prob)
    for n in range(1, min(len(context), max_depth) + 1):
        assert tree.count(context[-n:]) == brute_count(seqs, context[-n:])


@settings(max_examples=400, deadline=None)
@given(
    seqs=sequences,
    max_depth=st.sampled_from([3, 5, 64]),
    context=st.lists(st.integers(0, 2), min_size=1, max_size=12),
    max_tokens=st.integers(1, 12),
    min_prob=st.sampled_from(MIN_PROBS),
)
def test_tree_draft_paths_occur_with_their_probabilities(
    seqs: list[list[int]], max_depth: int, context: list[int], max_tokens: int, min_prob: float
) -> None:
    tree = SuffixTree(max_depth)
    for seq_id, seq in enumerate(seqs):
        tree.extend(seq_id, seq)
    draft = tree.speculate(context, max_tokens, min_prob, tree=True)
    limit = match_limit(len(context), max_depth, max_tokens)
    assert draft.match_len == brute_match_len(seqs, context, limit)
    assert len(draft) <= max_tokens
    match = context[len(context) - draft.match_len :]
    paths: list[list[int]] = []
    for i, (token, parent) in enumerate(zip(draft.token_ids, draft.parents, strict=True)):
        assert -1 <= parent < i
        above = match if parent == -1 else paths[parent]
        path = [*above, token]
        paths.append(path)
        assert len(path) <= max_depth
        prob = 1.0 if parent == -1 else draft.probs[parent]
        expected = prob * (brute_count(seqs, path) / brute_count(seqs, above))
        assert draft.probs[i] == expected >= min_prob
    assert len({tuple(p) for p in paths}) == len(paths)  # no path drafted twice
    assert draft.probs == sorted(draft.probs, reverse=True)  # best-first


# ------------------------------------------------------------------------------------------
# Edge cases


def test_empty_tree() -> None:
    tree = SuffixTree(8)
    tree.check_integrity()
    assert len(tree) == 0
    assert tree.num_tokens() == tree.num_nodes() == 0
    assert tree.count([1]) == 0
    assert tree.speculate([1, 2, 3], 5) == Draft()
    assert tree.speculate([1, 2, 3], 5, tree=True) == Draft()
    assert 0 < tree.memory_bytes() < 64 * 1024  # construction is cheap


def test_empty_context_and_zero_max_tokens_give_empty_drafts() -> None:
    tree = SuffixTree(8)
    tree.extend(0, [1, 2, 3, 1, 2, 3])
    for use_tree in (False, True):
        assert tree.speculate([], 5, 0.0, use_tree) == Draft()
        assert tree.speculate([1, 2], 0, 0.0, use_tree) == Draft()
        assert tree.speculate([1, 2], 5, 0.0, use_tree).token_ids == [3, 1, 2, 3]


def test_remove_unknown_id_raises_key_error() -> None:
    tree = SuffixTree(8)
    tree.extend(1, [1, 2])
    with pytest.raises(KeyError):
        tree.remove(2)
    tree.remove(1)
    with pytest.raises(KeyError):
        tree.remove(1)


def test_empty_extend_creates_the_sequence() -> None:
    pair = Pair(4)
    pair.extend(3, [])
    pair.check_structure()
    assert 3 in pair.native
    pair.remove(3)
    assert 3 not in pair.native


def test_context_longer_than_max_depth() -> None:
    pair = Pair(4)
    pair.extend(0, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    context = [3, 3, 3, 3, 3, 0, 1, 2, 3, 0]
    for max_tokens in (1, 2, 3, 10):
        for use_tree in (False, True):
            pair.check_speculate(context, max_tokens, 0.0, use_tree)
    assert pair.native.speculate(context, 1, 0.0).match_len == 3  # limit max_depth - 1


def test_removing_everything_frees_every_node() -> None:
    pair = Pair(16)
    rng = random.Random(5)
    for seq_id in range(6):
        pair.extend(seq_id, [rng.randrange(4) for _ in range(200)])
    memory_full = pair.native.memory_bytes()
    for seq_id in range(6):
        pair.remove(seq_id)
        pair.check_structure()
    assert pair.native.num_nodes() == 0
    assert pair.native.num_tokens() == 0
    assert pair.native.speculate([1, 2], 4) == Draft()
    # Node chunks are kept for reuse, but no sequence storage is left.
    assert pair.native.memory_bytes() < memory_full - 6 * 200 * 4


def test_extend_after_other_sequences_were_removed() -> None:
    """Edges of surviving nodes may reference removed sequences; new sequences reuse slots."""
    pair = Pair(8)
    rng = random.Random(9)
    for seq_id in range(5):
        pair.extend(seq_id, [rng.randrange(3) for _ in range(60)])
    for seq_id in (0, 2, 3):
        pair.remove(seq_id)
        pair.check_structure()
    for seq_id in (0, 7, 1, 2):  # a re-added id, a new one, an existing one
        pair.extend(seq_id, [rng.randrange(3) for _ in range(60)])
        pair.check_structure()
        random_probes(pair, rng, 3, 20)


def test_remove_keeps_strings_shared_with_other_sequences() -> None:
    tree = SuffixTree(8)
    tree.extend(0, [5, 6, 7, 8, 9])
    tree.extend(1, [5, 6, 7])
    before = tree.memory_bytes()
    tree.remove(0)  # "5 6 7" survives; its edge may still point into sequence 0
    tree.check_integrity()
    assert tree.count([5, 6, 7]) == 1
    assert tree.count([8]) == 0
    assert tree.memory_bytes() <= before


def test_32_bit_token_values_and_64_bit_ids() -> None:
    lo, hi = -(2**31), 2**31 - 1
    pair = Pair(6)
    tokens = [lo, hi, 0, -1, lo, hi, 0, 1, lo, hi]
    pair.extend(2**62, tokens)
    pair.extend(-(2**63), np.array(tokens[::-1], dtype=np.int64))
    pair.check_structure()
    assert pair.native.count([lo, hi]) == 3
    for use_tree in (False, True):
        pair.check_speculate([hi, 0, -1, lo], 4, 0.0, use_tree)
        pair.check_speculate([lo], 8, 0.0, use_tree)
    assert pair.native.speculate([lo], 1, 0.0).token_ids == [hi]
    pair.remove(2**62)
    pair.check_structure()


def test_token_arrays_of_any_integer_dtype_and_stride() -> None:
    pair = Pair(8)
    base = np.arange(40, dtype=np.int64) % 5
    pair.extend(0, base[::2])  # strided
    pair.extend(1, base.astype(np.uint8))
    pair.check_structure()
    pair.check_speculate(list(base[::2][-5:]), 6, 0.0, tree=True)
    assert pair.native.count(np.array([0, 2], dtype=np.int16)) == pair.reference.count([0, 2])


def test_large_max_tokens_in_tree_mode() -> None:
    """Drafts larger than the native core's leaders record (32) fall back to a full scan."""
    pair = Pair(6)
    rng = random.Random(3)
    pair.extend(0, [rng.randrange(50) for _ in range(3000)])
    for max_tokens in (1, 31, 32, 33, 100, 1000):
        for min_prob in (0.0, 0.01):
            pair.check_speculate([7], max_tokens, min_prob, tree=True)
            pair.check_speculate([7], max_tokens, min_prob, tree=False)


def test_memory_accounting_covers_nodes_and_tokens() -> None:
    tree = SuffixTree(64)
    rng = np.random.default_rng(0)
    for seq_id in range(20):
        tree.extend(seq_id, rng.integers(0, 50, 500))
    assert tree.memory_bytes() >= 32 * tree.num_nodes() + 4 * tree.num_tokens()
    assert tree.num_nodes() <= 2 * tree.num_tokens()
