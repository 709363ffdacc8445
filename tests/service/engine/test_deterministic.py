"""Deterministic (batch-invariant) mode: a token's logits are bitwise the same however it is
batched, so speculation reproduces the non-speculative tokens and logprobs bit for bit."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from drafter import RolloutHistory
from service.commands import add_worker_parser, settings_from
from service.engine import Engine, EngineConfig, RequestOutput
from service.engine import runner as runner_module
from service.engine.models import Tokenizer
from service.engine.runner import Runner
from service.worker import GenerateRequest
from tests.service.engine.test_engine import SAMPLED, history_of, make_engine, requests

LENGTH = 40  # tokens of the sequence under test


def sequence(seed: int, length: int = LENGTH, vocab: int = 512) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


def feed(runner: Runner, slot: int, tokens: list[int], sizes: list[int]) -> torch.Tensor:
    """Feed `tokens` to `slot` alone in chunks of `sizes`; the logits of every token."""
    rows, fed = [], 0
    for size in sizes:
        rows.append(runner.forward([slot], [tokens[fed : fed + size]]))
        fed += size
    return torch.cat(rows)


CHUNKINGS = {
    "one-by-one": [1] * LENGTH,
    "prefill-then-drafts": [12, 9, 1, 9, 2, 7],
    "odd-chunks": [3, 1, 2, 5, 9, 4, 1, 1, 6, 8],
    "whole": [LENGTH],
}


def test_logits_do_not_depend_on_chunking_or_slot(tiny_model: torch.nn.Module) -> None:
    tokens = sequence(0)
    reference = feed(Runner(tiny_model, 1, 64, deterministic=True), 0, tokens, [1] * LENGTH)
    for name, sizes in CHUNKINGS.items():
        runner = Runner(tiny_model, 4, 64, deterministic=True)
        assert torch.equal(feed(runner, 3, tokens, sizes), reference), name
    # The same model: as close to the default mode's logits as those are to Hugging Face's.
    default = feed(Runner(tiny_model, 1, 64), 0, tokens, [LENGTH])
    torch.testing.assert_close(reference, default, atol=1e-4, rtol=0)


def test_default_mode_is_only_close(tiny_model: torch.nn.Module) -> None:
    # What deterministic mode fixes, as measured here: a single-token step (a gemv) and a
    # chunk round differently, so the two agree to ~1e-6, not bitwise.
    tokens = sequence(0)
    one = feed(Runner(tiny_model, 1, 64), 0, tokens, CHUNKINGS["one-by-one"])
    chunked = feed(Runner(tiny_model, 1, 64), 0, tokens, CHUNKINGS["prefill-then-drafts"])
    torch.testing.assert_close(one, chunked, atol=1e-4, rtol=0)
    assert not torch.equal(one, chunked)


def test_logits_do_not_depend_on_batch_companions_or_rollback(
    tiny_model: torch.nn.Module,
) -> None:
    tokens = sequence(0)
    reference = feed(Runner(tiny_model, 1, 64, deterministic=True), 0, tokens, [1] * LENGTH)
    runner = Runner(tiny_model, 4, 64, deterministic=True)
    others = {0: sequence(1, 60), 3: sequence(2, 60)}
    fed = {0: 0, 2: 0, 3: 0}
    # Per step: chunk sizes for slots (2: ours, 0, 3); then how many of our chunk to keep.
    steps = [(7, 30, 1, 7), (9, 1, 2, 4), (9, 5, 1, 9), (1, 1, 9, 1), (5, 1, 3, 2)]
    steps += [(9, 9, 9, 9), (1, 2, 2, 1), (7, 1, 1, 7)]
    rows = []
    for ours, size0, size3, keep in steps:
        slots = [0, 2, 3]
        chunks = [
            others[0][fed[0] : fed[0] + size0],
            tokens[fed[2] : fed[2] + ours],
            others[3][fed[3] : fed[3] + size3],
        ]
        logits = runner.forward(slots, chunks)
        rows.append(logits[size0 : size0 + keep])
        fed[0] += size0
        fed[3] += size3
        fed[2] += keep
        runner.truncate(2, fed[2])  # rejected draft tokens are fed again next step
    assert fed[2] == LENGTH
    assert torch.equal(torch.cat(rows), reference)


def test_row_invariance_check_rejects_single_row_matmuls(tiny_model: torch.nn.Module) -> None:
    # A plain one-row matmul is a gemv that rounds differently: the guard must see it.
    weights = Runner(tiny_model, 1, 8, deterministic=True)._weights()
    with pytest.raises(RuntimeError, match="round a row differently"):
        runner_module._check_row_invariance(weights, F.linear)


def assert_bitwise_same(expected: list[RequestOutput], actual: list[RequestOutput]) -> None:
    assert [o.request_id for o in expected] == [o.request_id for o in actual]
    for want, got in zip(expected, actual, strict=True):
        for a, b in zip(want.samples, got.samples, strict=True):
            assert b.token_ids == a.token_ids
            assert b.logprobs == a.logprobs  # floats compared exactly
            assert b.top_logprobs == a.top_logprobs


@pytest.mark.parametrize("n", [1, 2])
def test_speculation_is_bitwise_lossless(tiny_model: torch.nn.Module, n: int) -> None:
    params = dataclasses.replace(SAMPLED, n=n)
    alone = [
        make_engine(tiny_model, max_batch=n, deterministic=True).generate([r])[0]
        for r in requests(params)
    ]
    # Every request with others, in fewer slots than samples (they queue and join late),
    # verifying fixed:4 drafts from a partly wrong history.
    history = history_of(alone, corrupt_every=5)
    engine = make_engine(tiny_model, "fixed:4", history, max_batch=3, deterministic=True)
    crowded = engine.generate(requests(params))
    assert engine.stats.accepted_tokens > 0
    assert engine.stats.accepted_tokens < engine.stats.drafted_tokens
    assert_bitwise_same(alone, crowded)


def test_deterministic_flag_reaches_the_settings() -> None:
    parser = argparse.ArgumentParser()
    add_worker_parser(parser.add_subparsers())
    assert settings_from(parser.parse_args(["worker", "--deterministic"])).deterministic
    assert not settings_from(parser.parse_args(["worker"])).deterministic
    assert not EngineConfig().deterministic


@pytest.mark.slow
def test_speculation_is_bitwise_lossless_on_smollm2(
    smollm2: tuple[torch.nn.Module, Tokenizer],
) -> None:
    model, tokenizer = smollm2
    assert tokenizer is not None
    texts = ["The capital of France is", "def fibonacci(n):"]
    params = dataclasses.replace(SAMPLED, n=2, max_tokens=32, top_logprobs=0)
    reqs = [
        GenerateRequest(f"r{i}", tokenizer.encode(text), params) for i, text in enumerate(texts)
    ]

    def engine(speculation: str, max_batch: int, history: RolloutHistory | None = None) -> Engine:
        config = EngineConfig(
            max_batch=max_batch, max_model_len=128, speculation=speculation, deterministic=True
        )
        return Engine(config, model=model, tokenizer=tokenizer, history=history)

    alone = [engine("none", 2).generate([r])[0] for r in reqs]
    spec = engine("fixed:4", 4, history_of(alone, corrupt_every=5))
    assert_bitwise_same(alone, spec.generate(reqs))
    assert spec.stats.accepted_tokens > 0
