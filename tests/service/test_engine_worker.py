"""EngineWorker on its own (no HTTP): the engine thread, shutdown, errors, Redis sharing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from drafter import DrafterConfig
from service.commands import add_serve_parser, settings_from
from service.engine import Engine
from service.engine.models import tiny_random_model
from service.engine_worker import EngineWorker
from service.errors import EngineFailure, InvalidRequest, Unavailable
from service.history_store import HistoryStore, connect_redis
from service.metrics import Metrics
from service.settings import Settings
from service.worker import GenerateRequest, SampleDelta, SamplingParams
from tests.service.conftest import RedisServer

PROMPT = [3, 14, 15, 92, 65]
LONG = SamplingParams(max_tokens=400, ignore_eos=True, temperature=0.8, seed=9)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_worker(redis_url: str | None = None, **overrides: Any) -> EngineWorker:
    settings = Settings(
        **{"model": "tiny-random", "max_model_len": 512, "max_batch": 4, **overrides}
    )
    metrics = Metrics()
    redis = connect_redis(redis_url, 0.5) if redis_url else None
    store = HistoryStore(
        DrafterConfig(), metrics, settings.worker_name, redis, sync_interval_s=0.02
    )
    return EngineWorker(settings, store, metrics)


def request(rid: str, params: SamplingParams = LONG, group: str | None = None) -> GenerateRequest:
    return GenerateRequest(rid, PROMPT, params, group)


async def until(check: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


def test_close_ends_running_requests_with_abort() -> None:
    async def main() -> None:
        worker = make_worker()
        await worker.start()
        assert worker.health()["status"] == "ok"
        running = asyncio.create_task(worker.generate(request("a")))
        deltas: list[SampleDelta] = []

        async def consume() -> None:
            async for delta in worker.stream(request("b")):
                deltas.append(delta)

        streaming = asyncio.create_task(consume())
        await until(lambda: len(deltas) > 2)
        await worker.close()
        (sample,) = await running
        await streaming
        assert sample.finish_reason == "abort" and 0 < len(sample.token_ids) < 400
        assert deltas[-1].finish_reason == "abort"
        assert sum(len(d.token_ids) for d in deltas) < 400
        assert worker.health()["status"] == "stopped"
        with pytest.raises(Unavailable, match="shutting down"):
            await worker.generate(request("c"))

    asyncio.run(main())


def test_errors_reach_the_caller_and_the_thread_survives() -> None:
    async def main() -> None:
        worker = make_worker()
        await worker.start()
        try:
            with pytest.raises(InvalidRequest, match="no tokenizer"):
                worker.tokenize("hello")
            with pytest.raises(InvalidRequest, match="no tokenizer"):
                worker.apply_chat_template([{"role": "user", "content": "hi"}])
            assert worker.detokenize([5, 6]) == ""
            with pytest.raises(InvalidRequest, match="max_model_len"):
                await worker.generate(request("long", SamplingParams(max_tokens=600)))
            with pytest.raises(InvalidRequest, match="token ids"):
                await worker.generate(GenerateRequest("vocab", [1, 10_000]))
            with pytest.raises(InvalidRequest, match="cannot load"):
                await worker.update_weights("/nonexistent/weights")
            first = asyncio.create_task(worker.generate(request("dup")))
            await asyncio.sleep(0)
            with pytest.raises(InvalidRequest, match="already running"):
                await worker.generate(request("dup"))
            assert (await first)[0].finish_reason == "length"

            # A forward that fails fails its batch, not the worker.
            engine = worker._engine
            assert engine is not None
            failures = iter([RuntimeError("device lost")])

            def broken_step(self: Engine) -> Any:
                error = next(failures, None)
                if error is not None:
                    raise error
                return Engine.step(self)

            engine.step = broken_step.__get__(engine)  # type: ignore[method-assign]
            with pytest.raises(EngineFailure, match="generation failed") as failed:
                await worker.generate(request("x"))
            assert str(failed.value.__cause__) == "device lost"  # for the log only
            after = SamplingParams(max_tokens=8, ignore_eos=True)  # no seed: EOS could come early
            (sample,) = await worker.generate(request("y", after))
            assert len(sample.token_ids) == 8
            assert worker.load() == (0, 0)
        finally:
            await worker.close()

    asyncio.run(main())


def test_abort_pause_and_idle() -> None:
    async def main() -> None:
        worker = make_worker(spec_policy="fixed:4")
        await worker.start()
        try:
            await worker.pause()
            held = asyncio.create_task(worker.generate(request("p", SamplingParams(max_tokens=4))))
            await until(lambda: worker.load() == (0, 1))
            assert await worker.abort("p") == 1
            (sample,) = await held
            assert sample.finish_reason == "abort" and sample.token_ids == []
            assert await worker.abort("unknown") == 0
            await worker.resume()
            # Idle: the engine thread blocks on its queue instead of spinning.
            thread = worker._thread
            assert thread is not None and thread.is_alive()
            before = _thread_cpu(thread)
            await asyncio.sleep(0.3)
            if before is not None:
                after = _thread_cpu(thread)
                assert after is not None and after - before < 0.05
        finally:
            await worker.close()

    asyncio.run(main())


def _thread_cpu(thread: threading.Thread) -> float | None:
    """CPU seconds a thread has used (Linux), None where unknown."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks


def test_rollouts_are_shared_through_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    """Worker B drafts from the rollouts worker A recorded, read back from Redis."""
    params = SamplingParams(max_tokens=48, ignore_eos=True, temperature=0.8, seed=5)

    async def main() -> None:
        a = make_worker(redis_server.url, spec_policy="fixed:4", worker_id="a")
        b = make_worker(redis_server.url, spec_policy="fixed:4", worker_id="b")
        await a.start()
        await b.start()
        try:
            (want,) = await a.generate(request("r1", params, group="shared"))
            await until(lambda: a.store.pending == 0)
            assert a.server_info()["redis_up"]
            (got,) = await b.generate(request("r1", params, group="shared"))
            assert got.token_ids == want.token_ids  # lossless
            assert got.spec.accepted_tokens > 0  # drafted from A's rollout
            assert want.spec.accepted_tokens < got.spec.accepted_tokens
            await until(lambda: b.server_info()["history_groups"] == 1)
            tiny_random_model(seed=1).save_pretrained(tmp_path / "v1")
            assert await b.update_weights(str(tmp_path / "v1")) == 1
            await until(lambda: b.server_info()["weight_version"] == "1")
            assert b.server_info()["history_groups"] == 1  # within the window: kept
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_weight_update_sets_the_version_it_is_given(tmp_path: Path) -> None:
    """The engine's load_weights path takes the version (a worker that missed updates is
    brought to the deployment's); it never goes back, and is refused before any loading."""

    async def main() -> None:
        worker = make_worker()
        await worker.start()
        try:
            tiny_random_model(seed=1).save_pretrained(tmp_path / "v")
            assert await worker.update_weights_to(str(tmp_path / "v"), 5) == 5
            assert worker.health()["weight_version"] == 5
            assert worker.server_info()["weight_version"] == "5"
            with pytest.raises(InvalidRequest, match="behind this worker's 5"):
                await worker.update_weights_to("/nonexistent/weights", 4)
            assert await worker.update_weights_to(str(tmp_path / "v"), 5) == 5  # a reload
            assert await worker.update_weights(str(tmp_path / "v")) == 6  # no version: next
            (result,) = await worker.generate(request("after"))
            assert result.weight_version == 6
        finally:
            await worker.close()

    asyncio.run(main())


def test_serve_flags() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="das")
    add_serve_parser(parser.add_subparsers(dest="command"))

    def settings(*argv: str) -> Settings:
        return settings_from(parser.parse_args(["serve", *argv]))

    defaults = settings()
    assert defaults.model == "smollm2-135m" and defaults.speculation_policy == "das"
    tuned = settings("--model", "tiny-random", "--device", "cuda", "--dtype", "bfloat16",
                     "--spec-policy", "fixed:4", "--max-batch", "32")  # fmt: skip
    assert (tuned.model, tuned.device, tuned.dtype) == ("tiny-random", "cuda", "bfloat16")
    assert tuned.speculation_policy == "fixed:4" and tuned.max_batch == 32
    assert settings("--no-speculation").speculation_policy == "none"
    assert settings("--spec-policy", "none").speculation_policy == "none"
    with pytest.raises(ValueError, match="unknown policy"):
        settings("--spec-policy", "sometimes")
    with pytest.raises(SystemExit):
        settings("--dtype", "int8")


def test_tree_drafts_setting_reaches_the_engine() -> None:
    """--tree-drafts (DAS_TREE_DRAFTS) reaches the engine's history, which then drafts trees
    (off by default); a second rollout of a group with the first one's seed repeats it token
    for token, verified from drafts of the first."""

    async def main() -> None:
        worker = make_worker(tree_drafts=True, spec_policy="fixed:4")
        await worker.start()
        try:
            assert worker._engine is not None and worker._engine.history.config.tree_drafts
            params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.8, seed=3)
            (first,) = await worker.generate(request("a", params, "g"))
            (second,) = await worker.generate(request("b", params, "g"))
            assert second.token_ids == first.token_ids
            assert second.spec.accepted_tokens > 0
        finally:
            await worker.close()

    asyncio.run(main())
    assert not make_worker()._config.drafter.tree_drafts
