"""Finished rollouts from an SGLang scheduler process to Redis.

The scheduler loop is synchronous and our history store (service/history_store.py) is async,
so the store runs on an event loop of its own in one daemon thread, and publish() only hands
the rollout over (call_soon_threadsafe): the scheduler never waits on Redis, and Redis being
down only buffers rollouts (the store's bounded buffer). Outbound only: rollouts that other
workers publish are not read into this worker's drafting history, which must change only at
the scheduler's deterministic events to stay identical on every tensor-parallel rank (the
gateway's group affinity keeps a group's rollouts on the worker that drafts for it).
Only tensor-parallel rank 0 publishes (worker.py), so each rollout is written once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from drafter.speculator import Rollout
from service.history_store import HistoryStore, connect_redis
from service.metrics import Metrics
from service.settings import Settings
from service.sglang_plugin.config import drafter_config

T = TypeVar("T")


class ThreadedPublisher:
    """A HistoryStore on its own loop thread; publish(rollout) from any thread."""

    def __init__(self, settings: Settings, worker: str | None = None) -> None:
        if not settings.redis_url:
            raise ValueError("publishing needs a Redis URL")
        self._settings = settings
        self._worker = worker or settings.worker_name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="das-history-publisher", daemon=True
        )
        self._thread.start()
        self.store: HistoryStore = self._call(self._start()).result()

    async def _start(self) -> HistoryStore:
        settings = self._settings
        assert settings.redis_url is not None
        store = HistoryStore(
            drafter_config(settings),
            Metrics(),
            self._worker,
            connect_redis(settings.redis_url, settings.redis_timeout_s),
            buffer_size=settings.history_buffer_size,
            sync_interval_s=settings.history_sync_interval_s,
            close_timeout_s=settings.history_close_timeout_s,
        )
        await store.start()
        return store

    def publish(self, rollout: Rollout) -> None:
        self._loop.call_soon_threadsafe(
            self.store.share, rollout.group, rollout.prompt, rollout.output, rollout.version
        )

    def close(self) -> None:
        """Flush what is buffered (retrying for history_close_timeout_s while Redis is down:
        what is left then is lost, logged and counted) and stop the thread."""
        if self._loop.is_closed():
            return
        self._call(self.store.close()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)
