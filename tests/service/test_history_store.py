"""Shared history through a real redis-server started by the test (never the one on 6379)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import redis

from drafter import DrafterConfig
from service.history_store import HistoryStore, connect_redis, pack_tokens, unpack_tokens
from service.metrics import Metrics

if TYPE_CHECKING:
    from tests.service.conftest import RedisServer, Server

PROMPT = list(b"Prove that sqrt(2) is irrational.")


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def generate(url: str, rid: str, seed: int, **extra: Any) -> dict[str, Any]:
    body = {
        "input_ids": PROMPT,
        "rid": rid,
        "sampling_params": {"max_new_tokens": 200, "temperature": 0.8, "sampling_seed": seed},
        "prompt_group": "g-sqrt2",
        **extra,
    }
    response = httpx.post(url + "/generate", json=body, timeout=10)
    assert response.status_code == 200
    out: dict[str, Any] = response.json()
    return out


def info(server: Server) -> dict[str, Any]:
    out: dict[str, Any] = httpx.get(server.url + "/get_server_info", timeout=5).json()
    return out


def test_pack_round_trip() -> None:
    assert unpack_tokens(pack_tokens([1, 2, 2**31 - 1])).tolist() == [1, 2, 2**31 - 1]


def test_worker_b_drafts_from_worker_a_rollouts(
    serve: Callable[..., Server], redis_server: RedisServer
) -> None:
    a = serve(redis_url=redis_server.url)
    b = serve(redis_url=redis_server.url)
    lonely = serve()  # no Redis: its history is its own
    for i in range(4):
        generate(a.url, f"a{i}", seed=i)
    keys = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: keys.xlen("das:rollouts:g-sqrt2") == 4)
    assert int(keys.hget("das:stats:g-sqrt2", "rollouts") or 0) == 4
    assert keys.sismember("das:groups", "g-sqrt2")

    shared = generate(b.url, "b0", seed=100)["meta_info"]
    alone = generate(lonely.url, "c0", seed=100)["meta_info"]
    assert shared["completion_tokens"] == alone["completion_tokens"]  # same tokens either way
    assert info(b)["history_groups"] == 1  # the group, rebuilt from Redis
    assert shared["spec_accepted_tokens"] > alone["spec_accepted_tokens"]
    assert shared["spec_verify_ct"] < alone["spec_verify_ct"]

    # Incremental: A's next rollouts reach B's history without B asking.
    before = info(b)["history_tokens"]
    for i in range(4, 6):
        generate(a.url, f"a{i}", seed=i)
    wait_for(lambda: info(b)["history_tokens"] > before)
    keys.close()


def test_redis_down_buffers_then_flushes(
    serve: Callable[..., Server], redis_server: RedisServer
) -> None:
    server = serve(redis_url=redis_server.url, redis_timeout_s=0.2)
    generate(server.url, "r0", seed=0)
    keys = redis.Redis.from_url(redis_server.url)
    wait_for(lambda: keys.xlen("das:rollouts:g-sqrt2") == 1)
    keys.close()

    redis_server.stop()
    for i in range(1, 4):
        out = generate(server.url, f"r{i}", seed=i)  # completions go on
        assert out["meta_info"]["completion_tokens"] > 0
    wait_for(lambda: info(server)["redis_up"] is False)
    assert info(server)["buffered_rollouts"] == 3
    metrics = httpx.get(server.url + "/metrics").text
    assert "das_buffered_rollouts" in metrics

    redis_server.start()  # same port, empty data (no persistence)
    wait_for(lambda: info(server)["buffered_rollouts"] == 0, timeout=10)
    keys = redis.Redis.from_url(redis_server.url)
    assert keys.xlen("das:rollouts:g-sqrt2") == 3
    keys.close()
    errors = [
        line
        for line in httpx.get(server.url + "/metrics").text.splitlines()
        if line.startswith("das_redis_errors_total")
    ]
    assert float(errors[0].split()[-1]) > 0


def test_buffer_drops_oldest_when_full_and_counts_them(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        redis_server.stop()
        metrics = Metrics()
        client = connect_redis(redis_server.url, 0.2)
        store = HistoryStore(DrafterConfig(), metrics, "w", client, buffer_size=2)
        for i in range(5):
            store.record("g", [1, 2], [10 + i, 11], version=0)
        assert store.pending == 2
        assert metrics.dropped_rollouts.labels(worker="w")._value.get() == 3
        assert len(store.history.recent_lengths("g")) == 5  # local history has them all
        redis_server.start()
        assert await store.flush() == 2
        entries = await client.xrange("das:rollouts:g")
        assert [unpack_tokens(fields[b"t"]).tolist() for _, fields in entries] == [
            [13, 11],
            [14, 11],
        ]
        await store.close()

    asyncio.run(scenario())


def test_versions_window_trims_streams_and_readers(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        config = DrafterConfig(window=2)
        writer = HistoryStore(config, Metrics(), "a", connect_redis(redis_server.url, 1.0))
        writer.record("g", [1, 2], [5, 6, 7], version=0)
        await writer.flush()
        await asyncio.sleep(0.01)  # version 1 starts at a later stream id than that entry
        await writer.set_version(1)
        await asyncio.sleep(0.01)  # the next version starts at a later stream id
        await writer.set_version(2)  # window 2: versions 1 and 2 kept; version 0 trimmed
        writer.record("g", [1, 2], [8, 9], version=2)
        await writer.flush()
        reader = HistoryStore(config, Metrics(), "b", connect_redis(redis_server.url, 1.0))
        await reader.set_version(2)
        await reader.ensure_group("g")
        assert reader.history.recent_lengths("g") == [2]
        stats = await reader.group_stats("g")
        # "g" had no rollout in the window at the trim, so it was forgotten and began again.
        assert stats["rollouts"] == 1 and stats["recent_lengths"] == [2]
        assert await writer.redis.xlen("das:rollouts:g") == 1  # type: ignore[union-attr]
        await writer.close()
        await reader.close()

    asyncio.run(scenario())


def test_a_group_with_no_rollout_left_in_the_window_is_forgotten(
    redis_server: RedisServer,
) -> None:
    async def scenario() -> None:
        config = DrafterConfig(window=2)
        writer = HistoryStore(config, Metrics(), "a", connect_redis(redis_server.url, 1.0))
        redis_client = writer.redis
        assert redis_client is not None
        writer.record("old", [1, 2], [5, 6, 7], version=0)
        writer.record("kept", [1, 2], [5, 6], version=0)
        await writer.flush()
        await asyncio.sleep(0.01)
        await writer.set_version(1)
        writer.record("kept", [1, 2], [8, 9], version=1)  # "kept" has a rollout in the window
        await writer.flush()
        await asyncio.sleep(0.01)
        await writer.set_version(2)  # window 2: versions 1 and 2; "old" has nothing left
        keys = {key.decode() for key in await redis_client.keys("das:*")}
        assert not {"das:rollouts:old", "das:stats:old", "das:lengths:old"} & keys
        assert {"das:rollouts:kept", "das:stats:kept", "das:lengths:kept"} <= keys
        assert await redis_client.smembers("das:groups") == {b"kept"}
        # A forgotten group written again is a new group that readers find as before.
        writer.record("old", [1, 2], [4, 4], version=2)
        await writer.flush()
        reader = HistoryStore(config, Metrics(), "b", connect_redis(redis_server.url, 1.0))
        await reader.set_version(2)
        await reader.ensure_group("old")
        assert reader.history.recent_lengths("old") == [2]
        assert (await reader.group_stats("old"))["rollouts"] == 1
        await writer.close()
        await reader.close()

    asyncio.run(scenario())


def test_store_without_redis_is_local() -> None:
    async def scenario() -> None:
        store = HistoryStore(DrafterConfig(), Metrics(), "w")
        await store.start()
        await store.ensure_group("g")
        store.record("g", [1], [2, 3], version=0)
        stats = await store.group_stats("g")
        assert stats["local_rollouts"] == 1 and "rollouts" not in stats
        await store.set_version(1)
        await store.close()

    asyncio.run(scenario())
