"""Benchmark of the suffix tree: speculate latency, extend cost and memory per stored token;
and of one verify step's drafts, batched (one native call) against a per-row loop.

    python -m bench.drafter [--json OUT] [--quick] [--min-prob P] [--part all|trees|batch]

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

Batched drafts (--part batch, written to the JSON's "batch" rows): one RL step of R live
requests (R = 1, 16, 64, 256) over 32 prompt groups, each group's tree holding 8 earlier rollouts
of 1,000 tokens (realistic tokens; a group's rollouts are one base sequence with 5% of its tokens
redrawn, so drafts are long), each request 64 prompt tokens and 100-900 tokens of its own variant
so far. Per row, microseconds per step of: RolloutHistory.speculate called in a Python loop,
RolloutHistory.speculate_batch (one native call), the speculation core's drafts() (budgets from
fixed:16, then the batched call), and the same loop and batch on suffix decoding's cache (the
suffix policy: global cache, per-request trees, capped drafts); drafts() under das and das-rate
(priced for a 7B on an H100: das drafts each row as deep as its calibrated chances could pay
and then cuts the drafts, das-rate sets budgets first); recording what a verify step appended
(2 tokens a row into the request's own tree and, with live siblings, its group's two trees):
Speculator.extend per row, and Speculator.extend_batch (one native call for every row's trees,
here with the trees spread over this machine's CPUs past 256 appended tokens, extend_threads 0;
the same timed on a twin workload that grows them on one thread, the default, the two taking
turns step by step);
and das's whole step: drafts(), then extend_batch recording each draft's first token as accepted
(its evidence included) and one more token, as an engine's verify step would. Medians over
repeated steps.
No timing is asserted: this prints tables and writes JSON.
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

from drafter.config import DrafterConfig
from drafter.cost import H100_7B
from drafter.das import DasConfig, DasPolicy
from drafter.history import RolloutHistory
from drafter.policy import FixedPolicy
from drafter.reference import ReferenceSuffixTree
from drafter.speculator import SpecRequest, Speculator
from drafter.suffix_decoding import SuffixDecodingCache
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


BATCH_ROWS = (1, 16, 64, 256)
BATCH_GROUPS = 32
BATCH_ROLLOUTS = 8  # per group
PROMPT_LEN = 64


@dataclass(slots=True)
class BatchRow:
    rows: int
    loop_us_per_row: float  # RolloutHistory.speculate, one Python call per row
    batch_us_per_row: float  # RolloutHistory.speculate_batch, one native call
    speculator_us_per_row: float  # Speculator.drafts (fixed:16 budgets + the batched call)
    suffix_loop_us_per_row: float  # SuffixDecodingCache.speculate per row
    suffix_batch_us_per_row: float  # SuffixDecodingCache.speculate_batch
    das_drafts_us_per_row: float  # Speculator.drafts under das (h100-7b prices), batched call
    das_rate_drafts_us_per_row: float  # the same under das-rate
    extend_loop_us_per_row: float  # Speculator.extend per row (2 tokens each)
    extend_batch_us_per_row: float  # Speculator.extend_batch, trees over the CPUs (threads 0)
    extend_one_thread_us_per_row: float  # the same with every tree grown on one thread
    das_step_us_per_row: float  # das's drafts() and extend_batch of what it accepted
    mean_draft_len: float
    steps_timed: int


def batch_workload(
    rows: int, extend_threads: int = 0
) -> tuple[
    RolloutHistory, SuffixDecodingCache, Speculator, list[SpecRequest], list[tuple[str, int]]
]:
    """The step of the module docstring: a history and a suffix cache holding the same
    rollouts and live requests, and the speculation core's handles of the requests (the
    history grows its trees on extend_threads threads, DrafterConfig.extend_threads)."""
    rng = np.random.default_rng(SEED + 5)
    generate = WORKLOADS["realistic"]
    history = RolloutHistory(DrafterConfig(max_depth=MAX_DEPTH, extend_threads=extend_threads))
    cache = SuffixDecodingCache()
    bases = generate(rng, BATCH_GROUPS)
    prompts = generate(rng, BATCH_GROUPS)[:, :PROMPT_LEN]

    def variant(group: int) -> Batch:
        out: Batch = bases[group].copy()
        redraw = rng.random(SEQ_LEN) < 0.05
        out[redraw] = generate(rng, 1)[0][: int(redraw.sum())]
        return out

    for group in range(BATCH_GROUPS):
        for i in range(BATCH_ROLLOUTS):
            output = variant(group)
            history.add_rollout(f"g{group}", output, 0, prompts[group])
            key = ("done", group * BATCH_ROLLOUTS + i)
            cache.start_request(key, f"g{group}", prompts[group])
            cache.extend_request(key, output)
            cache.stop_request(key)
    speculator = Speculator(history, FixedPolicy(MAX_TOKENS), max_draft=MAX_TOKENS)
    handles: list[SpecRequest] = []
    keys = []
    for row in range(rows):
        group = row % BATCH_GROUPS
        so_far = variant(group)[: int(rng.integers(100, 901))]
        handle = speculator.start(f"r{row}", f"g{group}", prompts[group])
        speculator.extend(handle, so_far.tolist(), 0, 0)
        handles.append(handle)
        keys.append(handle.key)
        cache.start_request(handle.key, f"g{group}", prompts[group])
        cache.extend_request(handle.key, so_far)
    return history, cache, speculator, handles, keys


def _median_us_per_row(step: Callable[[], object], rows: int, steps: int) -> float:
    times = np.empty(steps)
    for i in range(steps):
        start = time.perf_counter_ns()
        step()
        times[i] = time.perf_counter_ns() - start
    return float(np.median(times)) / 1e3 / rows


def _medians_us_per_row_in_turns(
    first: Callable[[], object], second: Callable[[], object], rows: int, steps: int
) -> tuple[float, float]:
    """_median_us_per_row of two steps timed alternately, so that both see the same load."""
    times = np.empty((steps, 2))
    for i in range(steps):
        for j, step in enumerate((first, second)):
            start = time.perf_counter_ns()
            step()
            times[i, j] = time.perf_counter_ns() - start
    first_us, second_us = np.median(times, axis=0) / 1e3 / rows
    return float(first_us), float(second_us)


def run_batch_case(rows: int, steps: int) -> BatchRow:
    history, cache, speculator, handles, keys = batch_workload(rows, extend_threads=0)
    budgets = [MAX_TOKENS] * rows
    caps = [MAX_TOKENS] * rows
    drafts = history.speculate_batch(keys, budgets)
    if drafts != [history.speculate(k, MAX_TOKENS) for k in keys]:
        raise RuntimeError("the batched drafts differ from the per-row ones")
    das = Speculator(history, DasPolicy(H100_7B), max_draft=MAX_TOKENS)
    das_drafts = _median_us_per_row(lambda: das.drafts(handles, caps), rows, steps)
    by_rate = Speculator(history, DasPolicy(H100_7B, DasConfig(rule="rate")), max_draft=MAX_TOKENS)
    das_rate_drafts = _median_us_per_row(lambda: by_rate.drafts(handles, caps), rows, steps)
    # What a verify step appends: two tokens a row (one accepted draft token and the
    # target's own), recorded per row or in one call. Timed last: the requests grow.
    appended = [list(draft.token_ids[:2]) if len(draft) >= 2 else [0, 0] for draft in drafts]
    drafted, accepted = [2] * rows, [1] * rows

    # A twin workload grows its trees on one thread; the two take turns step by step, from
    # the same trees (nothing has grown them yet).
    _, _, one_thread, twin_handles, _ = batch_workload(rows, extend_threads=1)
    extend_batch_us, extend_one_thread_us = _medians_us_per_row_in_turns(
        lambda: speculator.extend_batch(handles, appended, drafted, accepted),
        lambda: one_thread.extend_batch(twin_handles, appended, drafted, accepted),
        rows,
        steps,
    )

    def extend_loop() -> None:
        for handle, tokens in zip(handles, appended, strict=True):
            speculator.extend(handle, tokens, 2, 1)

    extend_loop_us = _median_us_per_row(extend_loop, rows, steps)

    def das_step() -> None:
        step = das.drafts(handles, caps)
        tokens = [[draft.token_ids[0], 0] if len(draft) else [0] for draft in step]
        sizes = [len(draft) for draft in step]
        das.extend_batch(handles, tokens, sizes, [min(1, size) for size in sizes])

    das_step_us = _median_us_per_row(das_step, rows, steps)
    return BatchRow(
        rows=rows,
        loop_us_per_row=_median_us_per_row(
            lambda: [history.speculate(k, MAX_TOKENS) for k in keys], rows, steps
        ),
        batch_us_per_row=_median_us_per_row(
            lambda: history.speculate_batch(keys, budgets), rows, steps
        ),
        speculator_us_per_row=_median_us_per_row(
            lambda: speculator.drafts(handles, caps), rows, steps
        ),
        suffix_loop_us_per_row=_median_us_per_row(
            lambda: [cache.speculate(k, MAX_TOKENS) for k in keys], rows, steps
        ),
        suffix_batch_us_per_row=_median_us_per_row(
            lambda: cache.speculate_batch(keys, budgets), rows, steps
        ),
        das_drafts_us_per_row=das_drafts,
        das_rate_drafts_us_per_row=das_rate_drafts,
        extend_loop_us_per_row=extend_loop_us,
        extend_batch_us_per_row=extend_batch_us,
        extend_one_thread_us_per_row=extend_one_thread_us,
        das_step_us_per_row=das_step_us,
        mean_draft_len=float(np.mean([len(d) for d in drafts])),
        steps_timed=steps,
    )


def print_batch_table(rows: list[BatchRow]) -> None:
    header = (
        f"{'rows':>5} {'loop':>8} {'batch':>8} {'drafts()':>9} {'speedup':>8} "
        f"{'sfx loop':>9} {'sfx batch':>9} {'das':>7} {'das-rate':>8} {'ext loop':>8} "
        f"{'ext batch':>9} {'ext 1 thr':>9} {'das step':>8} "
        f"{'draft len':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.rows:>5} {r.loop_us_per_row:>8.2f} {r.batch_us_per_row:>8.2f} "
            f"{r.speculator_us_per_row:>9.2f} {r.loop_us_per_row / r.batch_us_per_row:>7.1f}x "
            f"{r.suffix_loop_us_per_row:>9.2f} {r.suffix_batch_us_per_row:>9.2f} "
            f"{r.das_drafts_us_per_row:>7.2f} {r.das_rate_drafts_us_per_row:>8.2f} "
            f"{r.extend_loop_us_per_row:>8.2f} "
            f"{r.extend_batch_us_per_row:>9.2f} {r.extend_one_thread_us_per_row:>9.2f} "
            f"{r.das_step_us_per_row:>8.2f} "
            f"{r.mean_draft_len:>9.1f}"
        )
    print(
        "microseconds per row per step (medians): loop = RolloutHistory.speculate per row, "
        "batch = speculate_batch, drafts() = the speculation core's whole call; sfx = the "
        "suffix policy's cache; das, das-rate = drafts() under each (priced for a 7B on an "
        "H100); ext = recording a step's 2 tokens a row: Speculator.extend per row (loop) or "
        "extend_batch (one native call, trees over the CPUs; ext 1 thr: on one thread, the "
        "default); das step "
        "= das's drafts() and extend_batch of what it accepted."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    parser.add_argument(
        "--min-prob", type=float, default=0.0, help="speculate's min_prob (0: full drafts)"
    )
    parser.add_argument(
        "--part", choices=("all", "trees", "batch"), default="all", help="what to run"
    )
    args = parser.parse_args()
    rows = run_trees(args) if args.part != "batch" else []
    batch_rows = []
    if args.part != "trees":
        steps = 20 if args.quick else 200
        batch_rows = [run_batch_case(n, steps) for n in BATCH_ROWS]
    if rows:
        print_table(rows)
    if batch_rows:
        print_batch_table(batch_rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "seed": SEED,
        "max_depth": MAX_DEPTH,
        "max_tokens": MAX_TOKENS,
        "min_prob": args.min_prob,
        "context_len": CONTEXT_LEN,
        "speculate_calls": 500 if args.quick else 5_000,
        "part": args.part,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    payload = {
        "meta": meta,
        "rows": [asdict(r) for r in rows],
        "batch": [asdict(r) for r in batch_rows],
    }
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")


def run_trees(args: argparse.Namespace) -> list[Row]:
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
    return rows


if __name__ == "__main__":
    main()
