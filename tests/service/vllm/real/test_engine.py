"""DAS drafting inside a real vLLM engine on SmolLM2: the plugin is found, drafts reach vLLM's
verifier and are accepted, finished rollouts enter the engine core's history, and speculation
keeps the outputs: identical tokens at T = 0, the same per-position distribution at T = 0.7."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from service.vllm_backend.drafting import GROUP_ARG, ID_ARG, SAMPLE_ARG

pytestmark = pytest.mark.slow

PROMPTS = [
    "List the first twenty prime numbers, separated by commas:",
    "Write a short Python function that returns the factorial of n.",
]


def rpc(llm: Any, name: str, *args: Any) -> Any:
    return llm.collective_rpc("das_rpc", args=(name, *args))[0]


def params(
    temperature: float, max_tokens: int, seed: int | None, das_id: str = "", group: str = ""
) -> Any:
    from vllm import SamplingParams

    extra = {GROUP_ARG: group, SAMPLE_ARG: 0, ID_ARG: das_id} if das_id else None
    return SamplingParams(
        temperature=temperature, max_tokens=max_tokens, seed=seed, extra_args=extra
    )


def epoch(
    llm: Any, tag: str, temperature: float, max_tokens: int, samples: int = 2
) -> tuple[list[list[int]], dict[str, Any]]:
    """One round of `samples` rollouts per prompt, settled as the worker settles them."""
    prompts, plist, ids = [], [], []
    for p, text in enumerate(PROMPTS):
        for s in range(samples):
            das_id = f"{tag}-{p}-{s}"
            prompts.append(text)
            plist.append(params(temperature, max_tokens, 1000 * p + s, das_id, f"group-{p}"))
            ids.append(das_id)
    outputs = llm.generate(prompts, plist, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    ended = [
        (das_id, o.outputs[0].finish_reason in ("stop", "length"), len(t))
        for das_id, o, t in zip(ids, outputs, tokens, strict=True)
    ]
    return tokens, rpc(llm, "settle", ended)


def test_plugin_binds_das_and_drafts_are_accepted(das_llm: Any) -> None:
    assert rpc(das_llm, "stats")["policy"] == "das"  # DasProposer runs in vLLM's runner
    _, first = epoch(das_llm, "accept-0", 0.0, 96)
    assert len(first["rollouts"]) == 4 and not first["pending"]
    _, second = epoch(das_llm, "accept-1", 0.0, 96)
    counters = second["counters"].values()
    drafted = sum(c[1] for c in counters)
    accepted = sum(c[2] for c in counters)
    forwards = sum(c[0] for c in counters)
    generated = sum(len(r[2]) for r in second["rollouts"])
    assert drafted > 0 and accepted > 0
    # The same prompts at T = 0 repeat the history: most tokens come from drafts.
    assert generated / forwards > 2.0
    stats = rpc(das_llm, "stats")
    assert stats["history_groups"] == 2
    lengths = rpc(das_llm, "group_lengths")
    assert sorted(lengths) == ["group-0", "group-1"] and all(len(v) == 4 for v in lengths.values())


def test_greedy_tokens_identical_with_and_without_speculation(das_llm: Any, plain_llm: Any) -> None:
    das, _ = epoch(das_llm, "greedy-a", 0.0, 128)  # the groups' history is warm by now
    plain = [
        list(o.outputs[0].token_ids)
        for o in plain_llm.generate(
            [p for p in PROMPTS for _ in range(2)], params(0.0, 128, None), use_tqdm=False
        )
    ]
    assert das == plain


def chi_square_p(a: Sequence[int], b: Sequence[int]) -> float:
    """p-value of a two-sample chi-square test that a and b come from one distribution (rare
    categories pooled; the Wilson-Hilferty approximation of the chi-square tail)."""
    counts_a, counts_b = Counter(a), Counter(b)
    keys = sorted(set(counts_a) | set(counts_b), key=lambda k: -(counts_a[k] + counts_b[k]))
    table = np.array([[counts_a[k], counts_b[k]] for k in keys], dtype=np.float64)
    rare = table.sum(axis=1) < 10
    if rare.any():
        table = np.vstack([table[~rare], table[rare].sum(axis=0, keepdims=True)])
    table = table[table.sum(axis=1) > 0]
    if len(table) < 2:
        return 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    df = len(table) - 1
    z = ((statistic / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampling_distribution_unchanged_at_t07(
    make_llm: Callable[..., Any], plain_llm: Any
) -> None:
    """Per position, the token distribution over 240 seeds is the same with our drafts as
    without speculation; and, for equal seeds, how many sequences differ (vLLM's rejection
    sampler draws from its random stream differently once a draft is verified, so equal seeds
    need not give equal tokens). fixed:4 drafts on every step: the das budget, rightly, drafts
    nothing for 8-token rollouts, which is not what this test is about."""
    fixed = make_llm("suffix", {"policy": "fixed:4", "cost_model": "smollm2-cpu"})
    prompt, n, length = PROMPTS[0], 240, 8
    warm = [params(0.7, length, 7_000 + i, f"warm-{i}", "dist") for i in range(16)]
    outputs = fixed.generate([prompt] * 16, warm, use_tqdm=False)
    ended = [(f"warm-{i}", True, len(o.outputs[0].token_ids)) for i, o in enumerate(outputs)]
    rpc(fixed, "settle", ended)
    seeds = range(10_000, 10_000 + n)
    spec = fixed.generate(
        [prompt] * n, [params(0.7, length, s, f"dist-{s}", "dist") for s in seeds], use_tqdm=False
    )
    plain = plain_llm.generate(
        [prompt] * n, [params(0.7, length, s) for s in seeds], use_tqdm=False
    )
    answer = rpc(fixed, "settle", [(f"dist-{s}", True, length) for s in seeds])
    drafted = sum(c[1] for c in answer["counters"].values())
    accepted = sum(c[2] for c in answer["counters"].values())
    assert drafted > n and accepted > 0  # speculation really ran
    a = [list(o.outputs[0].token_ids) for o in spec]
    b = [list(o.outputs[0].token_ids) for o in plain]
    mismatched = sum(x != y for x, y in zip(a, b, strict=True))
    print(
        f"T=0.7: {mismatched}/{n} sequences differ for equal seeds; "
        f"drafted {drafted}, accepted {accepted}"
    )
    for position in range(length):
        pa = [t[position] for t in a if len(t) > position]
        pb = [t[position] for t in b if len(t) > position]
        # 8 positions tested: Bonferroni at a 1e-3 family-wise level.
        assert chi_square_p(pa, pb) > 1e-3 / length, position
