"""Streamed text equals the whole text on SmolLM2: the incremental detokenizer in the worker's
stream path against the one decode of a non-streamed request, for many seeds, with and without
stop strings that span token boundaries."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import torch

from drafter import DrafterConfig
from service.engine_worker import EngineWorker
from service.history_store import HistoryStore
from service.metrics import Metrics
from service.settings import Settings
from service.worker import GenerateRequest, SampleResult, SamplingParams

SEEDS = range(8)
T = TypeVar("T")


@dataclass
class Running:
    worker: EngineWorker
    loop: asyncio.AbstractEventLoop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = Settings(model="smollm2-135m", max_batch=8, cost_model="smollm2-cpu")
    metrics = Metrics()
    store = HistoryStore(DrafterConfig(), metrics, settings.worker_name)
    it = Running(EngineWorker(settings, store, metrics), asyncio.new_event_loop())
    it.run(it.worker.start())
    yield it
    it.run(it.worker.close())
    it.loop.close()
    torch.set_num_threads(threads)


@dataclass
class Streamed:
    texts: dict[int, str] = field(default_factory=dict)  # by sample index
    tokens: dict[int, list[int]] = field(default_factory=dict)
    stops: dict[int, object] = field(default_factory=dict)
    pieces: dict[int, int] = field(default_factory=dict)  # deltas that carried text


async def whole_and_streamed(
    worker: EngineWorker, prompt: list[int], params: SamplingParams, tag: str
) -> tuple[list[SampleResult], Streamed]:
    """The same request (same seed) run whole and streamed side by side in one batch."""
    streamed = Streamed()

    async def stream() -> None:
        async for delta in worker.stream(GenerateRequest(f"s-{tag}", prompt, params, "g")):
            i = delta.index
            streamed.texts[i] = streamed.texts.get(i, "") + delta.text
            streamed.tokens.setdefault(i, []).extend(delta.token_ids)
            streamed.pieces[i] = streamed.pieces.get(i, 0) + bool(delta.text)
            if delta.finish_reason is not None:
                streamed.stops[i] = delta.matched_stop

    whole, _ = await asyncio.gather(
        worker.generate(GenerateRequest(f"w-{tag}", prompt, params, "g")), stream()
    )
    return whole, streamed


@pytest.mark.slow
def test_streamed_text_equals_the_whole_text_for_many_seeds(running: Running) -> None:
    worker = running.worker
    prompt = worker.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about café, naïve résumé and 東京."}]
    )
    for seed in SEEDS:
        params = SamplingParams(max_tokens=32, temperature=1.0, seed=seed, n=2)
        whole, streamed = running.run(whole_and_streamed(worker, prompt, params, str(seed)))
        for sample in whole:
            assert streamed.tokens[sample.index] == sample.token_ids, seed
            assert streamed.texts[sample.index] == sample.text, seed
            assert sample.text == worker.detokenize(sample.token_ids)
            if len(sample.token_ids) >= 16:  # the text streams as it grows, not at the end
                assert streamed.pieces[sample.index] >= 4, seed


@pytest.mark.slow
def test_stop_strings_spanning_tokens_cut_both_alike(running: Running) -> None:
    worker = running.worker
    prompt = worker.apply_chat_template([{"role": "user", "content": "Count from 1 to 30."}])
    for seed in SEEDS[:5]:
        free = SamplingParams(max_tokens=48, temperature=0.9, seed=seed)
        (sample,) = running.run(worker.generate(GenerateRequest(f"f{seed}", prompt, free, "g")))
        text = sample.text
        # Two characters astride a token boundary, from the middle of the text.
        ends = [len(worker.detokenize(sample.token_ids[:k])) for k in range(len(sample.token_ids))]
        boundary = next(
            (
                e
                for e in ends
                if len(text) // 3 <= e < len(text) - 1 and text[e - 1 : e + 1].strip()
            ),
            None,
        )
        if boundary is None:
            continue
        stop = text[boundary - 1 : boundary + 1]
        for keep in (False, True):
            params = SamplingParams(
                max_tokens=48, temperature=0.9, seed=seed, stop=(stop,), no_stop_trim=keep
            )
            tag = f"{seed}-{keep}"
            whole, streamed = running.run(whole_and_streamed(worker, prompt, params, tag))
            (cut,) = whole
            assert cut.finish_reason == "stop" and cut.matched_stop == stop
            assert streamed.stops[0] == stop
            assert streamed.texts[0] == cut.text and streamed.tokens[0] == cut.token_ids
            assert text.startswith(worker.detokenize(cut.token_ids))
            if keep:
                assert stop in cut.text
            else:
                assert cut.text == text[: text.find(stop)]
