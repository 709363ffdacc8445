"""Rollout history: the worker's local RolloutHistory, shared with other workers through Redis.

Redis layout (prefix "das" by default), one stream per prompt group:

    {prefix}:rollouts:{group}   stream, one entry per finished rollout, fields
                                  w: writer instance, v: policy version,
                                  p: prompt tail (the last max_depth prompt tokens), t: output
                                  tokens; tokens as packed little-endian int32 bytes.
                                  Capped at max_rollouts_per_group entries (exact MAXLEN).
    {prefix}:groups             set of every group that has a stream (for trimming)
    {prefix}:stats:{group}      hash: rollouts, tokens (running totals since the group was
                                  last forgotten, below)
    {prefix}:lengths:{group}    list of the newest output lengths (newest first, capped)
    {prefix}:version_starts     hash: policy version -> first stream id seen under it
    {prefix}:written:{instance} the sequence number of the last rollout this writer instance
                                  (one worker process) wrote: makes a write sent again a
                                  no-op; expires WATERMARK_TTL_S after the instance's last
                                  write, so the keys of stopped workers go away

Per-group streams make "rebuild a group when this worker takes it over" one XRANGE-like read
of a short stream, and incremental sync one XREAD over the groups this worker holds, each from
its last id. A weight update trims every group stream to the window of policy versions
(XTRIM MINID at the start of the oldest kept version); readers also drop entries older than
the window, so late writes of old versions never enter a tree. A group left with no rollout in
the window is forgotten then (its stream, stats and lengths deleted, its name taken out of the
groups set; atomically, so a rollout written meanwhile stays): an RL run sees new prompts every
step, and Redis holds only the groups of the last `window` versions.

Redis being down never fails a completion: rollouts always go into the local history at once
and into a bounded buffer for Redis; a background task flushes the buffer when Redis is back
(the oldest buffered rollouts are dropped first, and counted, when the buffer is full). A flush
that fails is sent again whole, yet each rollout is written once: its entry, stats and lengths
go in one script that does nothing if the writer's watermark already covers its sequence number
(Redis may have applied part or all of a batch whose reply was lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from drafter import DrafterConfig, GroupStats, RolloutHistory
from drafter.draft import Tokens, as_token_array
from drafter.history import length_stats
from service.metrics import Metrics

log = logging.getLogger(__name__)

_READ_BATCH = 256  # streams per XREAD call
_FLUSH_BATCH = 256  # rollouts per pipeline
_READ_COUNT = 1000  # entries per stream per XREAD call
# A writer's watermark outlives its last write by this much: a batch whose reply was lost is
# sent again when Redis answers again, so this bounds the outage after which a rollout could be
# written twice; each worker process started adds one key, so this bounds how many are kept.
WATERMARK_TTL_S = 7 * 24 * 3600

# One rollout's write, atomic and idempotent: nothing if the writer (ARGV[1]) has written this
# sequence number (ARGV[2]) or a later one, else its watermark (expiring in ARGV[9] s), its
# stream entry (fields w, v, p, t), its group's name in the groups set, stats and newest
# lengths (both capped at ARGV[7]).
# KEYS: rollouts, groups, stats, lengths, the writer's watermark. ARGV: instance, sequence
# number, version, prompt, tokens, length, cap, group, watermark TTL. Returns 1 if written,
# else 0.
_WRITE_ROLLOUT = """
local last = tonumber(redis.call('GET', KEYS[5]) or '0')
if last >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[5], ARGV[2], 'EX', ARGV[9])
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[7], '*', 'w', ARGV[1], 'v', ARGV[3], 'p', ARGV[4],
    't', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[8])
redis.call('HINCRBY', KEYS[3], 'rollouts', 1)
redis.call('HINCRBY', KEYS[3], 'tokens', ARGV[6])
redis.call('LPUSH', KEYS[4], ARGV[6])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
return 1
"""

# A weight update's trim of one group, atomic (no rollout written meanwhile is lost): its stream
# trimmed to the window's first id (ARGV[1]); if that leaves it empty, the group is forgotten:
# its stream, stats and lengths deleted and its name (ARGV[2]) removed from the groups set.
# KEYS: rollouts, stats, lengths, groups. Returns 1 if forgotten, else 0.
_TRIM_GROUP = """
redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[2])
return 1
"""


@dataclass(frozen=True, slots=True)
class _Pending:
    sequence: int  # this writer's count of rollouts shared, from 1
    group: str
    version: int
    prompt: bytes  # packed int32
    tokens: bytes  # packed int32
    length: int


def pack_tokens(tokens: Sequence[int] | np.ndarray) -> bytes:
    return as_token_array(tokens).astype("<i4", copy=False).tobytes()


def unpack_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i4").astype(np.int32)


def connect_redis(url: str, timeout_s: float) -> Redis:
    """A client that fails fast: no retries, short timeouts (the buffer does the retrying)."""
    client: Redis = Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )
    return client


class LocalHistory(Protocol):
    """What the store needs of the history a worker drafts from (RolloutHistory, or a view
    of one owned by another thread)."""

    def add_rollout(
        self, group: str, output: Tokens, version: int, prompt: Tokens = ()
    ) -> bool: ...
    def set_version(self, version: int) -> int: ...
    def group_stats(self, group: str) -> GroupStats: ...
    def groups(self) -> list[str]: ...
    def num_tokens(self) -> int: ...


class HistorySnapshot:
    """The read side of a history that lives on another thread or process (the engine
    thread's, vLLM's engine core's): what its owner last published, the recent lengths per
    group, the tokens held and the policy version. An owner on another thread replaces whole
    entries (never mutates one in place), so a reader's copy is consistent."""

    def __init__(self, config: DrafterConfig, version: int = 0) -> None:
        self.config = config
        self.lengths: dict[str, list[int]] = {}
        self.tokens = 0
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    def groups(self) -> list[str]:
        return list(self.lengths)

    def num_tokens(self) -> int:
        return self.tokens

    def recent_lengths(self, group: str) -> list[int]:
        return list(self.lengths.get(group, ()))

    def group_stats(self, group: str) -> GroupStats:
        return length_stats(group, self.recent_lengths(group))


class HistoryStore:
    """Local drafting history for the groups routed here, optionally shared through Redis.

    All methods run on the worker's event loop (RolloutHistory is not thread-safe).
    """

    def __init__(
        self,
        config: DrafterConfig,
        metrics: Metrics,
        worker: str,
        redis: Redis | None = None,
        buffer_size: int = 10_000,
        sync_interval_s: float = 0.05,
        prefix: str = "das",
        close_timeout_s: float = 10.0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if close_timeout_s < 0:
            raise ValueError(f"close_timeout_s must be >= 0, got {close_timeout_s}")
        self._close_timeout = close_timeout_s
        if sync_interval_s <= 0:
            raise ValueError(f"sync_interval_s must be > 0, got {sync_interval_s}")
        self.config = config
        self.history: LocalHistory = RolloutHistory(config)
        self.redis = redis
        self._metrics = metrics
        self._worker = worker
        # Entries this process wrote are skipped on read (they are already local); a restarted
        # worker gets a new instance id and so rebuilds its own earlier rollouts too.
        self._instance = f"{worker}/{uuid.uuid4().hex[:12]}".encode()
        self._prefix = prefix
        self._interval = sync_interval_s
        self._pending: deque[_Pending] = deque()
        self._buffer_size = buffer_size
        self._cursors: dict[str, bytes] = {}  # group -> last stream id read
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False  # the sync loop's stop signal (see close)
        self._shared = 0  # rollouts shared so far: the next one's sequence number - 1
        self._write_rollout: AsyncScript | None = None
        self._trim_group: AsyncScript | None = None
        if redis is not None:
            self._write_rollout = redis.register_script(_WRITE_ROLLOUT)
            self._trim_group = redis.register_script(_TRIM_GROUP)
        self.redis_up = redis is not None
        labels = {"worker": worker}
        # Read through self.history, so they follow use_history.
        metrics.history_tokens.labels(**labels).set_function(lambda: self.history.num_tokens())
        metrics.history_groups.labels(**labels).set_function(lambda: len(self.history.groups()))
        metrics.buffered_rollouts.labels(**labels).set_function(lambda: len(self._pending))
        self._redis_errors = metrics.redis_errors.labels(**labels)
        self._dropped = metrics.dropped_rollouts.labels(**labels)
        self._synced = metrics.synced_rollouts.labels(**labels)

    def use_history(self, history: LocalHistory) -> None:
        """Feed this history (the one the worker drafts from) instead of the store's own."""
        self.history = history

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self.redis is not None and self._task is None:
            self._task = asyncio.create_task(self._sync_loop(), name="history-sync")

    async def close(self) -> None:
        if self._task is not None:
            # The flag ends the loop even if the cancellation is lost in a Redis call or
            # an await that completes at the same moment.
            self._closing = True
            self._wake.set()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.redis is not None:
            await self._final_flush()
            await self.redis.aclose()

    async def _final_flush(self) -> None:
        """At shutdown: flush what is buffered, retrying while Redis is away for at most
        close_timeout_s; what is still buffered then is lost, logged and counted."""
        assert self.redis is not None
        deadline = time.monotonic() + self._close_timeout
        while self._pending:
            try:
                await self.flush()
            except (RedisError, OSError):
                self._redis_failed()
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(min(self._interval * 4, max(0.0, deadline - time.monotonic())))
        if self._pending:
            lost = len(self._pending)
            self._pending.clear()
            self._dropped.inc(lost)
            log.error(
                "shutdown: %d buffered rollouts lost (Redis unreachable for %.1f s)",
                lost,
                self._close_timeout,
            )

    # -- the worker's calls -------------------------------------------------------------

    async def ensure_group(self, group: str) -> None:
        """Make the group's history local before its request drafts: on first sight, rebuild
        it from Redis (if Redis is down, the sync loop catches up later)."""
        if group in self._cursors:
            return
        self._cursors[group] = b"0-0"
        if self.redis is None:
            return
        try:
            await self._read({group: b"0-0"})
        except (RedisError, OSError):
            self._redis_failed()

    def record(
        self, group: str, prompt: Sequence[int], tokens: Sequence[int], version: int
    ) -> None:
        """A finished rollout: into the local history now, into Redis soon."""
        self.history.add_rollout(group, tokens, version, prompt[-self.config.max_depth :])
        self.share(group, prompt, tokens, version)

    def share(self, group: str, prompt: Sequence[int], tokens: Sequence[int], version: int) -> None:
        """A finished rollout already in the local history: into Redis soon (if configured)."""
        if self.redis is None:
            return
        prompt_tail = list(prompt[-self.config.max_depth :])
        if len(self._pending) >= self._buffer_size:
            self._pending.popleft()
            self._dropped.inc()
        self._shared += 1
        self._pending.append(
            _Pending(
                self._shared,
                group,
                version,
                pack_tokens(prompt_tail),
                pack_tokens(tokens),
                len(tokens),
            )
        )
        self._wake.set()

    async def set_version(self, version: int) -> None:
        """A new policy version: evict old rollouts locally and trim the shared streams."""
        self.history.set_version(version)
        if self.redis is None:
            return
        try:
            await self._trim(version)
        except (RedisError, OSError):
            self._redis_failed()

    async def group_stats(self, group: str) -> dict[str, Any]:
        """Length statistics of a group: shared ones from Redis when it answers, else local."""
        local = self.history.group_stats(group)
        stats: dict[str, Any] = {
            "group": group,
            "local_rollouts": local.rollouts,
            "mean_length": local.mean_length,
            "p50_length": local.p50_length,
            "p90_length": local.p90_length,
            "max_length": local.max_length,
        }
        if self.redis is None:
            return stats
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self._key("stats", group))
            pipe.lrange(self._key("lengths", group), 0, -1)
            totals, lengths = await pipe.execute()
        except (RedisError, OSError):
            self._redis_failed()
            return stats
        stats["rollouts"] = int(totals.get(b"rollouts", 0))
        stats["tokens"] = int(totals.get(b"tokens", 0))
        stats["recent_lengths"] = [int(x) for x in lengths]
        return stats

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- Redis traffic ------------------------------------------------------------------

    async def flush(self) -> int:
        """Write buffered rollouts to Redis; the number written. Raises if Redis fails (the
        batch in flight goes back to the buffer; those of its rollouts Redis did write are
        skipped when it is sent again)."""
        assert self.redis is not None
        write_rollout = self._write_rollout
        assert write_rollout is not None  # registered with the client
        written = 0
        cap = self.config.max_rollouts_per_group
        groups, watermark = self._key("groups"), self._key("written", self._instance.decode())
        kinds = ("rollouts", "stats", "lengths")
        while self._pending:
            batch = [self._pending.popleft() for _ in range(min(_FLUSH_BATCH, len(self._pending)))]
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for item in batch:
                        stream, stats, lengths = (self._key(kind, item.group) for kind in kinds)
                        await write_rollout(
                            keys=[stream, groups, stats, lengths, watermark],
                            args=[
                                self._instance,
                                item.sequence,
                                item.version,
                                item.prompt,
                                item.tokens,
                                item.length,
                                cap,
                                item.group,
                                WATERMARK_TTL_S,
                            ],
                            client=pipe,
                        )
                    done = sum(await pipe.execute())
            except BaseException:
                self._requeue(batch)
                raise
            written += done
            self._synced.inc(done)
        return written

    async def poll(self) -> int:
        """Read new entries of every group held here; the number of rollouts added."""
        added = 0
        groups = list(self._cursors)
        for start in range(0, len(groups), _READ_BATCH):
            chunk = groups[start : start + _READ_BATCH]
            added += await self._read({group: self._cursors[group] for group in chunk})
        return added

    async def _read(self, cursors: Mapping[str, bytes]) -> int:
        assert self.redis is not None
        streams: dict[Any, Any] = {
            self._key("rollouts", group): cursor for group, cursor in cursors.items()
        }
        if not streams:
            return 0
        replies: Any = await self.redis.xread(streams, count=_READ_COUNT)
        added = 0
        offset = len(self._key("rollouts", ""))
        for key, entries in replies or []:
            group = (key.decode() if isinstance(key, bytes) else key)[offset:]
            for entry_id, fields in entries:
                self._cursors[group] = entry_id
                if fields.get(b"w") == self._instance:
                    continue
                added += self.history.add_rollout(
                    group,
                    unpack_tokens(fields[b"t"]),
                    int(fields[b"v"]),
                    unpack_tokens(fields[b"p"]),
                )
        return added

    async def _trim(self, version: int) -> None:
        assert self.redis is not None
        starts = self._key("version_starts")
        seconds, micros = await self.redis.time()  # the server's clock stamps stream ids
        await self.redis.hsetnx(starts, str(version), f"{seconds * 1000 + micros // 1000}-0")
        oldest = version - self.config.window + 1
        if oldest <= 0:
            return
        minid = await self.redis.hget(starts, str(oldest))
        if minid is None:
            return
        groups = self._key("groups")
        trim_group = self._trim_group
        assert trim_group is not None  # registered with the client
        pipe = self.redis.pipeline(transaction=False)
        async for group in self.redis.sscan_iter(groups):
            name = group.decode() if isinstance(group, bytes) else group
            keys = [self._key(kind, name) for kind in ("rollouts", "stats", "lengths")]
            await trim_group(keys=[*keys, groups], args=[minid, name], client=pipe)
        forgotten = sum(await pipe.execute())
        if forgotten:
            log.info("version %d: %d groups with no rollout left forgotten", version, forgotten)

    async def _sync_loop(self) -> None:
        while not self._closing:
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancellation
            # that arrives as the wait completes, and close() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            if self._closing:
                return
            self._wake.clear()
            try:
                await self.flush()
                await self.poll()
            except (RedisError, OSError):
                self._redis_failed()
                await asyncio.sleep(self._interval * 4)  # back off while Redis is away
            else:
                if not self.redis_up:
                    log.warning("redis is back; history sync resumed")
                self.redis_up = True

    def _requeue(self, batch: list[_Pending]) -> None:
        # Put an unwritten batch back in front, dropping the oldest if newer ones filled it.
        for item in reversed(batch):
            if len(self._pending) >= self._buffer_size:
                self._dropped.inc()
            else:
                self._pending.appendleft(item)

    def _redis_failed(self) -> None:
        self._redis_errors.inc()
        if self.redis_up:
            log.warning("redis unreachable; buffering rollouts (%d pending)", len(self._pending))
        self.redis_up = False

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))
