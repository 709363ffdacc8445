"""Shared history through a real redis-server started by the test (never the one on 6379)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import redis

from drafter import DrafterConfig
from service.history_store import (
    WATERMARK_TTL_S,
    HistoryStore,
    connect_redis,
    pack_tokens,
    unpack_tokens,
)
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


class FaultyLink:
    """A TCP proxy in front of a redis-server that can fail the next flush: "lose-reply" lets
    the request through whole and cuts the connection when the reply comes (Redis applied it
    all), "cut-request" lets through only the first `keep` bytes of the request and cuts (Redis
    applied the commands that arrived whole)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.fault = ""
        self.keep = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)

        flush_sent = False  # the last request was a flush's (it names a rollout stream)

        async def requests() -> None:
            nonlocal flush_sent
            while data := await client_r.read(1 << 16):
                flush = b"das:rollouts:" in data  # (the test's store never reads)
                if flush and self.fault == "cut-request":
                    server_w.write(data[: self.keep])
                    await server_w.drain()
                    await asyncio.sleep(0.2)  # Redis runs what arrived whole
                    self.fault = ""
                    break
                server_w.write(data)
                await server_w.drain()
                flush_sent = flush

        async def replies() -> None:
            while data := await server_r.read(1 << 16):
                if flush_sent and self.fault == "lose-reply":
                    await asyncio.sleep(0.2)  # the rest of the reply: Redis has run it all
                    self.fault = ""
                    break
                client_w.write(data)
                await client_w.drain()

        await asyncio.wait(
            [asyncio.create_task(requests()), asyncio.create_task(replies())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for writer in (client_w, server_w):
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def test_a_flush_sent_again_writes_each_rollout_once(redis_server: RedisServer) -> None:
    # A flush fails after Redis applied all of its batch (the reply lost) or part of it (the
    # request cut): the store keeps the batch and sends it again, and each rollout must still
    # be in Redis once, with its stats and length, in order.
    async def scenario() -> None:
        link = FaultyLink(redis_server.port)
        url = await link.start()
        store = HistoryStore(DrafterConfig(), Metrics(), "w", connect_redis(url, 1.0))
        control = redis.Redis.from_url(redis_server.url)
        expected: dict[str, list[list[int]]] = {"g": [], "h": []}

        def record(group: str, tokens: list[int]) -> None:
            store.record(group, [1, 2], tokens, version=0)
            expected[group].append(tokens)

        record("g", [7, 7, 7])
        assert await store.flush() == 1  # the write script is loaded now

        def in_redis() -> int:
            return int(control.xlen("das:rollouts:g") + control.xlen("das:rollouts:h"))

        for fault, keep in (("lose-reply", 0), ("cut-request", 700)):
            before = in_redis()
            for i in range(4):
                record("g", [10 + i, 11])
                record("h", [20 + i])
            link.fault, link.keep = fault, keep
            try:
                await store.flush()
            except (redis.RedisError, OSError):
                pass
            else:
                raise AssertionError(f"{fault}: the flush should have failed")
            assert store.pending == 8  # kept for the next flush
            applied = in_redis() - before
            assert 0 < applied < 8 if fault == "cut-request" else applied == 8
            assert await store.flush() == 8 - applied  # only what Redis had not written
            assert store.pending == 0
            for group, outputs in expected.items():
                entries = control.xrange(f"das:rollouts:{group}")
                assert [unpack_tokens(f[b"t"]).tolist() for _, f in entries] == outputs
                lengths = [len(tokens) for tokens in outputs]
                assert int(control.hget(f"das:stats:{group}", "rollouts") or 0) == len(outputs)
                assert int(control.hget(f"das:stats:{group}", "tokens") or 0) == sum(lengths)
                newest_first = [int(x) for x in control.lrange(f"das:lengths:{group}", 0, -1)]
                assert newest_first == lengths[::-1]
        # The writer's watermark: one key, its last sequence number, expiring (a stopped
        # worker's key goes away); nothing else is kept per writer.
        (watermark,) = control.keys("das:written*")
        assert watermark.startswith(b"das:written:w/")
        assert int(control.get(watermark) or 0) == 17  # 1 + 2 x 8 rollouts
        assert 0 < control.ttl(watermark) <= WATERMARK_TTL_S
        control.close()
        await store.close()
        await link.close()

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
