from __future__ import annotations

import asyncio
from typing import Any

import pytest

from drafter import DrafterConfig
from service.errors import InvalidRequest
from service.fake_worker import EOS, FakeWorker, prompt_group
from service.history_store import HistoryStore
from service.metrics import Metrics
from service.worker import GenerateRequest, SampleResult, SamplingParams

PROMPT = list(b"What is 2 + 2?")


def make_worker(**knobs: Any) -> FakeWorker:
    store = HistoryStore(DrafterConfig(), Metrics(), "test")
    return FakeWorker(store, **knobs)


def run(
    worker: FakeWorker, rid: str = "r", prompt: list[int] = PROMPT, **params: Any
) -> list[SampleResult]:
    request = GenerateRequest(rid, prompt, SamplingParams(**params))
    return asyncio.run(worker.generate(request))


def test_sampling_params_check_themselves() -> None:
    for bad in (
        {"n": 0},
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -2},
        {"seed": -1},
        {"stop": ("",)},
        {"stop_token_ids": (-1,)},
        {"top_logprobs": 3},
        {"logprobs": True, "top_logprobs": 99},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GenerateRequest("r", [])
    with pytest.raises(ValueError):
        GenerateRequest("", [1])


def test_outputs_are_reproducible_with_a_seed() -> None:
    a = run(make_worker(), seed=7, n=3, max_tokens=64, logprobs=True)
    b = run(make_worker(), seed=7, n=3, max_tokens=64, logprobs=True)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert len({tuple(s.token_ids) for s in a}) > 1  # samples differ by index
    assert all(s.seed == 7 for s in a)


def test_speculation_never_changes_the_output() -> None:
    with_spec = make_worker(spec_budget=8)
    without = make_worker(speculation=False)
    for epoch in range(3):
        a = run(with_spec, f"a{epoch}", seed=epoch, n=4, max_tokens=200, logprobs=True)
        b = run(without, f"b{epoch}", seed=epoch, n=4, max_tokens=200, logprobs=True)
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert all(s.spec.drafted_tokens == 0 for s in b)
    assert all(s.spec.forward_passes == len(s.token_ids) for s in b)
    # With history from earlier epochs, drafts are accepted: fewer forward passes than tokens.
    assert sum(s.spec.accepted_tokens for s in a) > 0
    assert sum(s.spec.forward_passes for s in a) < sum(len(s.token_ids) for s in a)
    for s in a:
        assert s.spec.forward_passes + s.spec.accepted_tokens == len(s.token_ids)


def test_greedy_is_the_base_answer_and_a_shorter_max_tokens_is_a_prefix() -> None:
    worker = make_worker()
    long = run(worker, "a", temperature=0, max_tokens=500)[0]
    short = run(worker, "b", temperature=0, max_tokens=5, seed=99)[0]
    assert long.finish_reason == "stop" and long.matched_stop == EOS
    assert long.token_ids[-1] == EOS
    assert short.finish_reason == "length" and short.token_ids == long.token_ids[:5]
    assert long.text == worker.detokenize(long.token_ids[:-1])


def test_max_tokens_stop_strings_and_stop_token_ids() -> None:
    worker = make_worker()
    base = run(worker, "a", temperature=0, max_tokens=500)[0]
    text = base.text
    stop = text[10:12]
    first = text.find(stop)
    out = run(worker, "b", temperature=0, max_tokens=500, stop=(stop,))[0]
    assert out.finish_reason == "stop" and out.matched_stop == stop
    assert out.text == text[:first]
    assert out.token_ids == base.token_ids[: first + len(stop)]
    kept = run(worker, "c", temperature=0, max_tokens=500, stop=(stop,), no_stop_trim=True)[0]
    assert kept.text == text[: first + len(stop)]
    token = base.token_ids[5]
    cut = base.token_ids.index(token)
    ids = run(worker, "d", temperature=0, max_tokens=500, stop_token_ids=(token,))[0]
    assert ids.finish_reason == "stop" and ids.matched_stop == token
    assert ids.token_ids == base.token_ids[: cut + 1]
    assert ids.text == text[:cut]
    ignore = run(worker, "e", temperature=0, max_tokens=400, ignore_eos=True)[0]
    assert len(ignore.token_ids) == 400 and ignore.finish_reason == "length"
    assert EOS not in ignore.token_ids


def test_top_logprobs_contain_the_sampled_token() -> None:
    out = run(make_worker(), max_tokens=8, logprobs=True, top_logprobs=3, seed=1)[0]
    assert out.top_logprobs is not None and out.logprobs is not None
    for token, logprob, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert top[token] == logprob and len(top) == 3


def test_rollouts_are_recorded_in_the_history() -> None:
    worker = make_worker()
    run(worker, "a", n=2, max_tokens=32, seed=1)
    history = worker.store.history
    assert history.groups() == [prompt_group(PROMPT)]
    assert len(history.recent_lengths(prompt_group(PROMPT))) == 2
    run(worker, "b", max_tokens=32, prompt=[1, 2, 3])
    assert len(history.groups()) == 2
    assert history.active_requests() == 0


def test_abort_returns_partial_output_and_pause_holds() -> None:
    async def scenario() -> None:
        worker = make_worker(step_delay_s=0.01, speculation=False)
        request = GenerateRequest("slow", PROMPT, SamplingParams(max_tokens=300, ignore_eos=True))
        task = asyncio.create_task(worker.generate(request))
        await asyncio.sleep(0.1)
        assert await worker.abort("slow") == 1
        (result,) = await task
        assert result.finish_reason == "abort"
        assert 0 < len(result.token_ids) < 300
        assert worker.store.history.groups() == []  # aborted rollouts are not history

        await worker.pause()
        queued = asyncio.create_task(
            worker.generate(GenerateRequest("q", PROMPT, SamplingParams(max_tokens=4)))
        )
        await asyncio.sleep(0.05)
        assert not queued.done() and worker.load() == (0, 1)
        await worker.resume()
        (done,) = await queued
        assert done.finish_reason == "length" and len(done.token_ids) == 4

        await worker.pause()
        held = asyncio.create_task(
            worker.generate(GenerateRequest("h", PROMPT, SamplingParams(max_tokens=4)))
        )
        await asyncio.sleep(0.02)
        assert await worker.abort(None) == 1
        (aborted,) = await held
        assert aborted.finish_reason == "abort" and aborted.token_ids == []
        await worker.resume()

    asyncio.run(scenario())


def test_worker_errors() -> None:
    worker = make_worker()
    with pytest.raises(InvalidRequest):
        run(worker, prompt=[1, 999])
    with pytest.raises(InvalidRequest):
        asyncio.run(worker.update_weights(""))
    assert asyncio.run(worker.update_weights("/new")) == 1
    assert worker.weight_version == 1


def test_tokenizer_round_trip_and_chat_template() -> None:
    worker = make_worker()
    assert worker.detokenize(worker.tokenize("héllo")) == "héllo"
    ids = worker.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in worker.detokenize(ids)
    assert worker.detokenize([EOS], skip_special_tokens=False) == "</s>"
    assert worker.detokenize([EOS]) == ""
