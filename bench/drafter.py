"""Benchmark of the suffix tree: speculate latency, extend cost and memory per stored token.

    python -m bench.drafter [--json OUT] [--quick] [--min-prob P]

(`python bench/drafter.py` works too with the editable install, whose import hook finds the
drafter package before this file's folder.)

Workloads (fixed seed, sequences of 1,000 tokens):
  hard       a first-order Markov chain over 50 tokens; each state moves to 8 random successors
             with Dirichlet(0.5) weights. Dense trees with long shared paths: the worst case
             for extend and for matching.
  realistic  a 32k vocabulary; tokens drawn i.i.d. from Zipf(1.1) over a random permutation of
             the ids, and on average 10 copies per sequence of phrases (8-32 tokens) from a pool
             of 1,000 with Zipf(1.1) popularity (about a fifth of the tokens are in phrases).
Trees of 10k, 100k and 1M tokens in one tree, and 1,000 groups (separate trees) of 10k tokens.
Speculate is timed per call through the Python SuffixTree API, max_tokens 16, on 64-token
windows of held-out sequences of the same generator; extend is timed per whole-sequence call and
reported per appended token, as is removing the oldest tenth of the sequences at the end.
The Python ReferenceSuffixTree runs at the smallest size only.
No timing is asserted: this prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from drafter.reference import ReferenceSuffixTree
from drafter.suffix_tree import SuffixTree

SEED = 20250101
SEQ_LEN = 1_000
CONTEXT_LEN = 64
MAX_TOKENS = 16
MAX_DEPTH = 64
HELD_OUT = 200
DEFAULT_JSON = Path(__file__).parent / "results" / "drafter.json"

Batch = npt.NDArray[np.int32]
Generator = Callable[[np.random.Generator, int], Batch]  # (rng, num_seqs) -> [num_seqs, SEQ_LEN]
Tree = SuffixTree | ReferenceSuffixTree


def markov_workload(vocab: int = 50, successors: int = 8) -> Generator:
    rng = np.random.default_rng(SEED)
    transitions = np.zeros((vocab, vocab))
    for state in range(vocab):
        targets = rng.choice(vocab, successors, replace=False)
        transitions[state, targets] = rng.dirichlet(np.full(successors, 0.5))
    cdf = np.cumsum(transitions, axis=1)
    cdf[:, -1] = 1.0

    def generate(rng: np.random.Generator, num_seqs: int) -> Batch:
        out = np.empty((num_seqs, SEQ_LEN), dtype=np.int32)
        state = rng.integers(0, vocab, num_seqs)
        for t in range(SEQ_LEN):
            u = rng.random(num_seqs)
            state = (u[:, None] > cdf[state]).sum(axis=1)  # inverse CDF, one row per sequence
            out[:, t] = state
        return out

    return generate


def zipf_workload(
    vocab: int = 32_000, exponent: float = 1.1, phrases: int = 1_000, copies: float = 10.0
) -> Generator:
    rng = np.random.default_rng(SEED + 1)
    ids = rng.permutation(vocab).astype(np.int32)
    weights = 1.0 / np.arange(1, vocab + 1) ** exponent
    token_cdf = np.cumsum(weights / weights.sum())
    popularity = 1.0 / np.arange(1, phrases + 1) ** exponent
    phrase_cdf = np.cumsum(popularity / popularity.sum())

    def draw(rng: np.random.Generator, shape: int | tuple[int, int]) -> Batch:
        ranks = np.minimum(np.searchsorted(token_cdf, rng.random(shape)), vocab - 1)
        drawn: Batch = ids[ranks]
        return drawn

    pool = [draw(rng, int(n)) for n in rng.integers(8, 33, phrases)]

    def generate(rng: np.random.Generator, num_seqs: int) -> Batch:
        out = draw(rng, (num_seqs, SEQ_LEN))
        for row in out:
            picks = np.searchsorted(phrase_cdf, rng.random(rng.poisson(copies)))
            for pick in picks:
                phrase = pool[min(int(pick), phrases - 1)]
                start = int(rng.integers(0, SEQ_LEN - len(phrase)))
                row[start : start + len(phrase)] = phrase
        return out

    return generate


WORKLOADS: dict[str, Generator] = {"hard": markov_workload(), "realistic": zipf_workload()}


@dataclass(slots=True)
class Row:
    workload: str
    tree: str  # "native" or "reference"
    layout: str  # "1 tree" or "1000 groups"
    tokens: int
    extend_us_per_token: float
    bytes_per_token: float
    nodes_per_token: float
    chain_p50_us: float
    chain_p99_us: float
    tree_p50_us: float
    tree_p99_us: float
    mean_match_len: float
    mean_chain_len: float
    mean_tree_len: float
    remove_us_per_token: float


def build(trees: list[Tree], data: Batch, label: str) -> float:
    """Extends the trees round-robin with the sequences of data; returns seconds spent in
    extend."""
    spent = 0
    for i in tqdm(range(len(data)), desc=f"build {label}", unit="seq", leave=False):
        tree, seq = trees[i % len(trees)], data[i]
        start = time.perf_counter_ns()
        tree.extend(i, seq)
        spent += time.perf_counter_ns() - start
    return spent / 1e9


def time_remove(trees: list[Tree], data: Batch, label: str) -> float:
    """Removes the oldest tenth of the sequences (as a sliding window does); returns
    microseconds per removed token."""
    spent = 0
    count = max(1, len(data) // 10)
    for i in tqdm(range(count), desc=f"remove {label}", unit="seq", leave=False):
        start = time.perf_counter_ns()
        trees[i % len(trees)].remove(i)
        spent += time.perf_counter_ns() - start
    return spent / 1e3 / (count * int(data.shape[1]))


def time_speculate(
    trees: list[Tree], contexts: Batch, use_tree: bool, min_prob: float, label: str
) -> tuple[npt.NDArray[np.float64], float, float]:
    """Per-call microseconds, mean match length and mean draft length."""
    rng = np.random.default_rng(SEED + 2)
    picks = rng.integers(0, len(trees), len(contexts))
    times = np.empty(len(contexts))
    match_lens = np.empty(len(contexts))
    lengths = np.empty(len(contexts))
    mode = "tree" if use_tree else "chain"
    for i in tqdm(range(len(contexts)), desc=f"{mode} {label}", unit="call", leave=False):
        tree, context = trees[picks[i]], contexts[i]
        start = time.perf_counter_ns()
        draft = tree.speculate(context, MAX_TOKENS, min_prob, use_tree)
        times[i] = (time.perf_counter_ns() - start) / 1e3
        match_lens[i] = draft.match_len
        lengths[i] = len(draft)
    return times, float(match_lens.mean()), float(lengths.mean())


def held_out_contexts(generate: Generator, num: int) -> Batch:
    rng = np.random.default_rng(SEED + 3)
    held = generate(rng, HELD_OUT)
    rows = rng.integers(0, HELD_OUT, num)
    starts = rng.integers(0, SEQ_LEN - CONTEXT_LEN, num)
    return np.stack([held[r, s : s + CONTEXT_LEN] for r, s in zip(rows, starts, strict=True)])


def run_case(
    workload: str,
    data: Batch,
    contexts: Batch,
    num_trees: int,
    reference: bool,
    min_prob: float,
) -> Row:
    kind = "reference" if reference else "native"
    layout = "1 tree" if num_trees == 1 else f"{num_trees} groups"
    label = f"{workload} {kind} {data.size // num_trees:,} tok x {num_trees}"
    make: type[SuffixTree] | type[ReferenceSuffixTree] = (
        ReferenceSuffixTree if reference else SuffixTree
    )
    trees: list[Tree] = [make(MAX_DEPTH) for _ in range(num_trees)]
    seconds = build(trees, data, label)
    chain, chain_match, chain_len = time_speculate(trees, contexts, False, min_prob, label)
    tree, _, tree_len = time_speculate(trees, contexts, True, min_prob, label)
    tokens = sum(t.num_tokens() for t in trees)
    memory = sum(t.memory_bytes() for t in trees)
    nodes = sum(t.num_nodes() for t in trees)
    remove_us = time_remove(trees, data, label)
    return Row(
        workload=workload,
        tree=kind,
        layout=layout,
        tokens=tokens,
        extend_us_per_token=seconds * 1e6 / tokens,
        bytes_per_token=memory / tokens,
        nodes_per_token=nodes / tokens,
        chain_p50_us=float(np.percentile(chain, 50)),
        chain_p99_us=float(np.percentile(chain, 99)),
        tree_p50_us=float(np.percentile(tree, 50)),
        tree_p99_us=float(np.percentile(tree, 99)),
        mean_match_len=chain_match,
        mean_chain_len=chain_len,
        mean_tree_len=tree_len,
        remove_us_per_token=remove_us,
    )


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'workload':<10} {'tree':<9} {'layout':<11} {'tokens':>10} {'ext us/tok':>10} "
        f"{'B/tok':>7} {'nodes/tok':>9} {'chain p50':>9} {'p99':>7} {'tree p50':>9} {'p99':>7} "
        f"{'match':>6} {'chain':>6} {'tree':>5} {'rm us/tok':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.workload:<10} {r.tree:<9} {r.layout:<11} {r.tokens:>10,} "
            f"{r.extend_us_per_token:>10.2f} {r.bytes_per_token:>7.1f} {r.nodes_per_token:>9.2f} "
            f"{r.chain_p50_us:>9.1f} {r.chain_p99_us:>7.1f} {r.tree_p50_us:>9.1f} "
            f"{r.tree_p99_us:>7.1f} {r.mean_match_len:>6.1f} {r.mean_chain_len:>6.1f} "
            f"{r.mean_tree_len:>5.1f} {r.remove_us_per_token:>9.2f}"
        )
    print(
        "speculate columns: microseconds per call (max_tokens 16); match / chain / tree: mean "
        "match length and draft lengths; rm: removing the oldest tenth of the sequences."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    parser.add_argument(
        "--min-prob", type=float, default=0.0, help="speculate's min_prob (0: full drafts)"
    )
    args = parser.parse_args()

    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    calls = 500 if args.quick else 5_000
    groups, group_tokens = (0, 0) if args.quick else (1_000, 10_000)
    rows: list[Row] = []
    for name, generate in WORKLOADS.items():
        rng = np.random.default_rng(SEED + 4)
        largest = max(sizes[-1], groups * group_tokens)
        data = generate(rng, largest // SEQ_LEN)
        contexts = held_out_contexts(generate, calls)
        for size in sizes:
            part = data[: size // SEQ_LEN]
            rows.append(run_case(name, part, contexts, 1, False, args.min_prob))
            if size == sizes[0]:
                ref_contexts = contexts[: min(calls, 1_000)]
                rows.append(run_case(name, part, ref_contexts, 1, True, args.min_prob))
        if groups:
            part = data[: groups * group_tokens // SEQ_LEN]
            rows.append(run_case(name, part, contexts, groups, False, args.min_prob))

    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "seed": SEED,
        "max_depth": MAX_DEPTH,
        "max_tokens": MAX_TOKENS,
        "min_prob": args.min_prob,
        "context_len": CONTEXT_LEN,
        "speculate_calls": calls,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
