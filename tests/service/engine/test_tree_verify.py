"""Tree drafts verified in the embedded engine: the runner's tree mask (each node sees the
cache, the chunk's tokens before the tree and its own ancestors, at the rotary position of its
depth), the compaction of the accepted path's K/V, and lossless acceptance on a tree."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drafter import DrafterConfig, RolloutHistory
from drafter.draft import Draft
from service.engine import Engine, EngineConfig, RequestOutput
from service.engine.engine import main_path
from service.engine.models import Tokenizer
from service.engine.runner import Runner, _AttentionPlan, _TreeMask
from service.worker import GenerateRequest, SamplingParams
from tests.service.engine.conftest import counting_prompts
from tests.service.engine.test_engine import (
    GREEDY,
    SAMPLED,
    assert_same_outputs,
    make_engine,
    requests,
)

ATOL = 1e-4  # what the chain tests allow a verify chunk against Hugging Face's forward
TREE_CONFIG = DrafterConfig(tree_drafts=True)


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(torch.tensor([tokens])).logits[0]
    return logits


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """The draft indices from the root's child down to `node`."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def tokens_of(seed: int, length: int, vocab: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


# -- the runner ------------------------------------------------------------------------------


def check_tree_step(model: torch.nn.Module, batched_max_chunk: int) -> None:
    """One forward with two tree chunks (one width class: they share a padded call where
    calls are batched), a chain draft and two plain decode rows; every tree node's logits must
    equal those of its root-to-node path fed as a chain, and every other row its own."""
    runner = Runner(model, slots=6, max_len=64, batched_max_chunk=batched_max_chunk)
    vocab = runner.vocab_size
    prompts = [tokens_of(seed, 9 + 3 * seed, vocab) for seed in range(5)]
    slots = [0, 1, 2, 3, 4]
    # Everything but each prompt's last token (slot 1: its last two) is cached.
    cached = [len(p) - (2 if slot == 1 else 1) for slot, p in zip(slots, prompts, strict=True)]
    runner.forward(slots, [p[:n] for p, n in zip(prompts, cached, strict=True)])
    trees: list[list[int] | None] = [
        [-1, 0, -1, 2, 0, 1],  # two root children, the first with two children
        [-1, -1, -1, 0, 3, 1],  # three root children; two uncached tokens before it
        None,  # a chain draft of 3
        None,  # plain decode
        [-1, 0, 1],  # a chain given as parents: the chain code path
    ]
    drafts = [tokens_of(100 + i, len(t) if t else 3 * (i == 2), vocab) for i, t in enumerate(trees)]
    drafts[3] = []
    chunks = [p[n:] + d for p, n, d in zip(prompts, cached, drafts, strict=True)]
    logits = runner.forward(slots, chunks, trees=trees)
    offset = 0
    for prompt, n, draft, parents, chunk in zip(
        prompts, cached, drafts, trees, chunks, strict=True
    ):
        rows = logits[offset : offset + len(chunk)]
        offset += len(chunk)
        before = len(chunk) - len(draft)
        if parents is None or not draft:
            torch.testing.assert_close(
                rows, hf_logits(model, prompt + draft)[n:], atol=ATOL, rtol=0
            )
            continue
        torch.testing.assert_close(rows[:before], hf_logits(model, prompt)[n:], atol=ATOL, rtol=0)
        for node in range(len(draft)):
            path = [draft[j] for j in path_to(parents, node)]
            want = hf_logits(model, prompt + path)[-1]
            torch.testing.assert_close(rows[before + node], want, atol=ATOL, rtol=0)
    assert runner.lengths[:5] == [len(p) + len(d) for p, d in zip(prompts, drafts, strict=True)]


@pytest.mark.parametrize("batched_max_chunk", [32, 0], ids=["batched", "looped"])
def test_tree_logits_equal_each_path_fed_as_a_chain(
    tiny_model: torch.nn.Module, batched_max_chunk: int
) -> None:
    check_tree_step(tiny_model, batched_max_chunk)


def test_tree_chunks_share_a_padded_call_with_their_width_class() -> None:
    device = torch.device("cpu")
    chunks = [[0] * 7, [0] * 8, [0], [0]]
    masks = _TreeMask.build_all(chunks, [[-1, -1, 0, 1, 2, 3], [-1, 0, -1], None, None], device)
    assert set(masks) == {0, 1}
    plan = _AttentionPlan.by_width([0, 1, 2, 3], [20] * 4, [7, 8, 1, 1], 32, device, masks)
    assert [g.tokens.tolist() for g in plan.grids] == [list(range(15)), [15, 16]]
    mask = plan.grids[0].grid.mask
    # Slot 0's node 2 (chunk column 3, cache position 23) sees the prefix, the pre-tree
    # token (20) and node 0 (21), its parent; not node 1 (22), its uncle.
    seen = mask[0, 0, 3].nonzero()[:, 0].tolist()
    assert seen == [*range(21), 21, 23]
    # A chain given as parents is no tree: no mask is built for it.
    assert _TreeMask.build_all([[0] * 4], [[-1, 0, 1]], device) == {}


def test_tree_arguments_are_checked(tiny_model: torch.nn.Module) -> None:
    runner = Runner(tiny_model, slots=2, max_len=32)
    with pytest.raises(ValueError, match="token before"):
        runner.forward([0], [[1, 2]], trees=[[-1, -1]])
    with pytest.raises(ValueError, match="parent"):
        runner.forward([0], [[1, 2, 3, 4]], trees=[[-1, 2, 0]])
    with pytest.raises(ValueError, match="same length"):
        runner.forward([0], [[1, 2, 3]], trees=[[-1, -1], None])
    runner.forward([0], [[1, 2, 3, 4]], trees=[[-1, -1, 1]])
    with pytest.raises(ValueError, match="not a path"):
        runner.keep_path(0, 1, [1, 0])
    with pytest.raises(ValueError, match="not a path"):
        runner.keep_path(0, 1, [3])


def test_keep_path_makes_the_next_step_equal_no_speculation(tiny_model: torch.nn.Module) -> None:
    """Verify a tree, keep a path through non-first children (its K/V move), then feed the
    bonus token with a draft: the logits equal a runner that decoded one token at a time."""
    runner = Runner(tiny_model, slots=3, max_len=64)
    plain = Runner(tiny_model, slots=3, max_len=64)
    vocab = runner.vocab_size
    prompt = tokens_of(7, 12, vocab)
    parents = [-1, 0, 1, -1, 3, 3, 5, 0]
    draft = tokens_of(8, len(parents), vocab)
    runner.forward([1], [prompt[:-1]])
    companion = tokens_of(9, 6, vocab)
    runner.forward([2], [companion[:-1]])
    runner.forward([1, 2], [[prompt[-1], *draft], [companion[-1]]], trees=[parents, None])
    path = path_to(parents, 6)  # nodes 3, 5, 6: a second root child, then its second child
    assert path == [3, 5, 6]
    runner.keep_path(1, len(prompt), path)
    assert runner.lengths[1] == len(prompt) + 3
    accepted = [draft[j] for j in path]
    bonus, next_draft = 17, [18, 19]
    logits = runner.forward([1, 2], [[bonus, *next_draft], [5]])
    decoded = [plain.forward([1], [prompt + accepted])[-1:]]
    for token in [bonus, *next_draft]:
        decoded.append(plain.forward([1], [[token]]))
    torch.testing.assert_close(logits[:3], torch.cat(decoded[1:]), atol=ATOL, rtol=0)
    # An empty path rolls the whole tree back; a path of first children moves nothing.
    runner.forward([1], [[3, 4, 5, 6]], trees=[[-1, 0, -1]])
    runner.keep_path(1, runner.lengths[1] - 3, [])
    runner.forward([1], [[4, 5, 6, 8]], trees=[[-1, 0, -1]])
    runner.keep_path(1, runner.lengths[1] - 3, [0, 1])
    logits = runner.forward([1], [[7]])
    expected = hf_logits(tiny_model, [*prompt, *accepted, bonus, *next_draft, 3, 4, 5, 6, 7])
    expected = expected[-1:]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


@st.composite
def tree_shapes(draw: st.DrawFn) -> list[int]:
    nodes = draw(st.integers(2, 12))
    return [draw(st.integers(-1, j - 1)) for j in range(nodes)]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parents=tree_shapes(),
    cached=st.integers(1, 20),
    uncached=st.integers(1, 3),
    companion=st.integers(0, 9),
    batched=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_trees_match_their_paths(
    tiny_model: torch.nn.Module,
    parents: list[int],
    cached: int,
    uncached: int,
    companion: int,
    batched: bool,
    seed: int,
) -> None:
    runner = Runner(tiny_model, slots=3, max_len=64, batched_max_chunk=32 if batched else 0)
    vocab = runner.vocab_size
    prompt = tokens_of(seed, cached + uncached, vocab)
    draft = tokens_of(seed + 1, len(parents), vocab)
    other = tokens_of(seed + 2, 5 + companion, vocab)
    runner.forward([0, 2], [prompt[:cached], other[:5]])
    chunks = [prompt[cached:] + draft]
    slots, trees = [0], list[list[int] | None]([parents])
    if companion:  # a chain verify (or a decode) beside the tree
        slots.append(2)
        chunks.append(other[5:])
        trees.append(None)
    logits = runner.forward(slots, chunks, trees=trees)
    for node in range(len(parents)):
        path = [draft[j] for j in path_to(parents, node)]
        want = hf_logits(tiny_model, prompt + path)[-1]
        torch.testing.assert_close(logits[uncached + node], want, atol=ATOL, rtol=0)
    if companion:
        torch.testing.assert_close(
            logits[len(chunks[0]) :], hf_logits(tiny_model, other)[5:], atol=ATOL, rtol=0
        )
    # Keep the path to the last node, then decode: as if the path had been fed as a chain.
    path = path_to(parents, len(parents) - 1)
    runner.keep_path(0, len(prompt), path)
    want = hf_logits(tiny_model, prompt + [draft[j] for j in path] + [1])[-1]
    torch.testing.assert_close(runner.forward([0], [[1]])[0], want, atol=ATOL, rtol=0)


def test_deterministic_runner_refuses_trees(tiny_model: torch.nn.Module) -> None:
    runner = Runner(tiny_model, slots=2, max_len=64, deterministic=True)
    with pytest.raises(ValueError, match="chain"):
        runner.forward([0], [[1, 2, 3]], trees=[[-1, -1]])
    runner.forward([0], [[1, 2, 3]], trees=[[-1, 0]])  # a chain is fine


@pytest.mark.slow
def test_smollm2_tree_logits_equal_each_path(smollm2: tuple[torch.nn.Module, Tokenizer]) -> None:
    model, _ = smollm2
    check_tree_step(model, 32)
    check_tree_step(model, 0)


# -- the engine ------------------------------------------------------------------------------


def tree_history(
    outputs: list[RequestOutput], corrupt_every: int = 5, config: DrafterConfig = TREE_CONFIG
) -> RolloutHistory:
    """A history (drafting trees by default) holding each output twice: as it is and with
    every corrupt_every-th token changed. At each change the suffix tree forks, the right and
    the wrong continuation equally likely, so a chain follows the wrong one about half the
    time and a tree drafts both."""
    history = RolloutHistory(config)
    for output in outputs:
        for sample in output.samples:
            tokens = list(sample.token_ids)
            wrong = list(tokens)
            for i in range(corrupt_every - 1, len(wrong), corrupt_every):
                wrong[i] = (wrong[i] - 1) % 512
            history.add_rollout(output.group, tokens, 0, output.prompt_token_ids)
            history.add_rollout(output.group, wrong, 0, output.prompt_token_ids)
    return history


class PathLog:
    """Records each tree the engine accepted on and the path it accepted."""

    def __init__(self, engine: Engine) -> None:
        self.trees: list[tuple[Draft, list[int]]] = []
        accept, keep = engine._accept_tree, engine.runner.keep_path
        current: list[Draft] = []

        def accept_tree(sequence: Any, draft: Draft, rows: torch.Tensor) -> Any:
            current[:] = [draft]
            return accept(sequence, draft, rows)

        def keep_path(slot: int, start: int, path: Sequence[int]) -> None:
            self.trees.append((current[0], list(path)))
            keep(slot, start, path)

        engine._accept_tree = accept_tree  # type: ignore[method-assign]
        engine.runner.keep_path = keep_path  # type: ignore[method-assign]

    def off_main_path(self) -> int:
        """Accepted paths that left the tree's most probable path (and its first children):
        what a chain of the same tree would have missed."""
        count = 0
        for draft, path in self.trees:
            main = main_path(draft).token_ids
            firsts: dict[int, int] = {}
            for node, parent in enumerate(draft.parents):
                firsts.setdefault(parent, node)
            chain = [draft.token_ids[j] for j in path]
            if chain != main[: len(chain)] and any(firsts[draft.parents[j]] != j for j in path):
                count += 1
        return count


@pytest.mark.parametrize("max_depth", [64, 8], ids=["deep", "shallow"])
@pytest.mark.parametrize(
    "params",
    [GREEDY, dataclasses.replace(GREEDY, n=3), dataclasses.replace(SAMPLED, n=3)],
    ids=["greedy", "greedy-n3", "sampled-n3"],
)
def test_tree_speculation_is_lossless_and_the_tree_matters(
    tiny_model: torch.nn.Module, params: SamplingParams, max_depth: int
) -> None:
    """max_depth 8 leaves 2 context tokens to match before a 6-token draft: the forks of the
    history recur all along the rollout, not only where the prompt's match is short."""
    config = DrafterConfig(tree_drafts=True, max_depth=max_depth)
    baseline = make_engine(tiny_model).generate(requests(params))
    engine = make_engine(
        tiny_model, "fixed:6", tree_history(baseline, config=config), drafter=config
    )
    log = PathLog(engine)
    assert_same_outputs(baseline, engine.generate(requests(params)))
    assert engine.stats.accepted_tokens > 0
    # Accepted paths through a child other than the first and off the most probable path:
    # tokens a chain of that path would have lost.
    assert log.trees and log.off_main_path() > 0
    # Drafts from the request's own context and its live siblings only (an empty history).
    fresh = make_engine(tiny_model, "fixed:6", RolloutHistory(config), drafter=config)
    assert_same_outputs(baseline, fresh.generate(requests(params)))


def test_tree_speculation_with_companions_and_das(tiny_model: torch.nn.Module) -> None:
    """Two slots for four requests of several lengths (they join and leave at different
    steps), under the das policy: the output is still the baseline's."""
    varied = [
        GenerateRequest(
            r.request_id, r.prompt_token_ids, dataclasses.replace(SAMPLED, max_tokens=m, n=2)
        )
        for r, m in zip(requests(SAMPLED), [40, 7, 23, 40], strict=True)
    ]
    baseline = make_engine(tiny_model).generate(varied)
    history = tree_history(baseline, corrupt_every=4)
    for speculation, batch in (("fixed:5", 2), ("das", 4)):
        engine = make_engine(
            tiny_model,
            speculation,
            history,
            max_batch=batch,
            drafter=TREE_CONFIG,
            cost_model="smollm2-cpu",
        )
        assert_same_outputs(baseline, engine.generate(varied))
        assert engine.stats.accepted_tokens > 0


def test_deterministic_mode_verifies_the_main_path_of_a_tree(tiny_model: torch.nn.Module) -> None:
    params = dataclasses.replace(SAMPLED, n=2)
    baseline = make_engine(tiny_model, deterministic=True).generate(requests(params))
    engine = make_engine(
        tiny_model, "fixed:6", tree_history(baseline), drafter=TREE_CONFIG, deterministic=True
    )
    forward = engine.runner.forward
    seen: list[object] = []

    def chains_only(*args: Any, **kwargs: Any) -> torch.Tensor:
        trees = args[3] if len(args) > 3 else kwargs.get("trees")
        seen.append(trees)
        return forward(*args, **kwargs)

    engine.runner.forward = chains_only  # type: ignore[method-assign]
    outputs = engine.generate(requests(params))
    for want, got in zip(baseline, outputs, strict=True):
        for a, b in zip(want.samples, got.samples, strict=True):
            assert (b.token_ids, b.logprobs) == (a.token_ids, a.logprobs)  # bitwise
    assert seen and all(trees is None for trees in seen)
    assert engine.stats.accepted_tokens > 0


def test_main_path_follows_the_most_probable_child() -> None:
    tree = Draft([5, 6, 7, 8, 9], [-1, 0, -1, 2, 2], [0.4, 0.2, 0.6, 0.1, 0.3], 1.6, 3)
    chain = main_path(tree)
    assert (chain.token_ids, chain.parents, chain.probs) == ([7, 9], [-1, 0], [0.6, 0.3])
    assert chain.score == pytest.approx(0.9) and chain.match_len == 3
    assert main_path(Draft()).token_ids == []


def test_engine_config_takes_tree_drafts() -> None:
    assert EngineConfig(drafter=TREE_CONFIG).drafter.tree_drafts


@pytest.mark.slow
def test_smollm2_tree_speculation_is_lossless(smollm2: tuple[torch.nn.Module, Tokenizer]) -> None:
    model, tokenizer = smollm2
    prompts = counting_prompts(tokenizer)
    config = EngineConfig(max_batch=4, max_model_len=256)
    for params in (
        dataclasses.replace(GREEDY, max_tokens=32, n=2),
        dataclasses.replace(SAMPLED, max_tokens=32, n=2),
    ):
        baseline = Engine(config, model=model, tokenizer=tokenizer).generate(
            requests(params, prompts)
        )
        shallow = DrafterConfig(tree_drafts=True, max_depth=8)
        spec = dataclasses.replace(config, speculation="fixed:6", drafter=shallow)
        history = tree_history(baseline, config=shallow)
        engine = Engine(spec, model=model, tokenizer=tokenizer, history=history)
        log = PathLog(engine)
        assert_same_outputs(baseline, engine.generate(requests(params, prompts)))
        assert engine.stats.accepted_tokens > 0 and log.off_main_path() > 0
