"""Rollouts from an SGLang scheduler process to Redis (publisher.py), against a real
redis-server of the test's own; and a worker on a rank other than 0 publishes nothing."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from drafter.speculator import Rollout
from service.history_store import HistoryStore, connect_redis
from service.metrics import Metrics
from service.settings import Settings
from service.sglang_plugin.config import drafter_config
from service.sglang_plugin.publisher import ThreadedPublisher


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


def settings(redis_url: str) -> Settings:
    return Settings(
        **{"backend": "sglang", "cost_model": "h100-7b", "redis_url": redis_url, "worker_id": "s"}
    )


def read_back(url: str, group: str) -> list[int]:
    """What another worker rebuilds of the group from Redis: its rollouts' lengths."""

    async def read() -> list[int]:
        store = HistoryStore(
            drafter_config(settings(url)), Metrics(), "reader", connect_redis(url, 0.5)
        )
        await store.ensure_group(group)
        lengths = store.history.group_stats(group)
        await store.close()
        return [lengths.rollouts, lengths.max_length]

    return asyncio.run(read())


def test_published_rollouts_reach_redis_for_the_other_workers(redis_url: str) -> None:
    publisher = ThreadedPublisher(settings(redis_url))
    publisher.publish(Rollout("g", [1, 2, 3], [4, 5, 6, 7], 0))
    publisher.publish(Rollout("g", [1, 2, 3], [4, 5], 0))
    deadline = time.monotonic() + 30
    while read_back(redis_url, "g") != [2, 4]:  # the store's sync loop flushes them
        assert time.monotonic() < deadline, read_back(redis_url, "g")
        time.sleep(0.05)
    publisher.close()
    assert read_back(redis_url, "g") == [2, 4]


def test_a_redis_that_is_down_fails_nothing() -> None:
    down = settings(f"redis://127.0.0.1:{free_port()}/0").model_copy(
        update={"history_close_timeout_s": 0.0}
    )
    publisher = ThreadedPublisher(down)
    for i in range(100):
        publisher.publish(Rollout("g", [1], [i], 0))  # hands over; the store buffers
    publisher.close()  # no time to retry: what is buffered is lost and counted
    assert publisher.store.pending == 0
    assert not publisher._thread.is_alive()


def test_publishing_needs_a_redis_url() -> None:
    with pytest.raises(ValueError, match="Redis URL"):
        ThreadedPublisher(Settings(**{"backend": "sglang"}))
