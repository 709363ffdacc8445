"""Routing policy: consistent hashing of prompt groups with bounded loads. Pure functions.

Each worker owns `vnodes` points on a 64-bit hash ring; a group goes to the first worker
clockwise from the group's hash that is healthy and not overloaded, where overloaded means its
in-flight load would exceed ceil((1 + eps) * (total load + 1) / healthy workers) (Mirrokni et
al., "Consistent Hashing with Bounded Loads"). So:
- a group sticks to one worker (its suffix trees stay warm) while loads are balanced;
- a hot worker sheds new requests to the next worker on the ring, never more than (1 + eps)
  times the average load sits on one worker;
- a dead worker's groups move to their next ring successors and nothing else moves (minimal
  movement); when it comes back, exactly those groups return.
Deterministic: the same ring, key, loads and health always give the same worker.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass


def ring_hash(key: str) -> int:
    # surrogatepass: a key taken from a request may hold a lone surrogate (JSON allows one)
    data = key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Ring:
    points: tuple[int, ...]  # sorted hash points
    owners: tuple[str, ...]  # owners[i] owns points[i]
    workers: tuple[str, ...]  # distinct workers, in the order given


def build_ring(workers: Sequence[str], vnodes: int = 64) -> Ring:
    if vnodes < 1:
        raise ValueError(f"vnodes must be >= 1, got {vnodes}")
    if len(set(workers)) != len(workers):
        raise ValueError("workers must be distinct")
    placed = sorted(
        (ring_hash(f"{worker}#{v}"), worker) for worker in workers for v in range(vnodes)
    )
    return Ring(
        points=tuple(point for point, _ in placed),
        owners=tuple(owner for _, owner in placed),
        workers=tuple(workers),
    )


def capacity(total_load: int, healthy: int, eps: float) -> int:
    """Most in-flight requests one worker may hold when the next request is placed."""
    if healthy < 1:
        raise ValueError("no healthy worker")
    return max(1, math.ceil((1.0 + eps) * (total_load + 1) / healthy))


def pick_worker(
    ring: Ring,
    key: str,
    loads: Mapping[str, int] | None = None,
    healthy: Collection[str] | None = None,
    eps: float = 0.25,
) -> str | None:
    """The worker for `key`; None if no worker is healthy. loads: in-flight requests per
    worker (missing: 0); healthy: the live workers (None: all)."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    live = [w for w in ring.workers if healthy is None or w in healthy]
    if not live or not ring.points:
        return None
    loads = loads or {}
    limit = capacity(sum(loads.get(w, 0) for w in live), len(live), eps)
    start = bisect.bisect_left(ring.points, ring_hash(key))
    seen: set[str] = set()
    count = len(ring.points)
    for step in range(count):
        owner = ring.owners[(start + step) % count]
        if owner in seen:
            continue
        seen.add(owner)
        if healthy is not None and owner not in healthy:
            continue
        if loads.get(owner, 0) < limit:
            return owner
        if len(seen) == len(ring.workers):
            break
    # Unreachable while some live worker is below the limit (the limit exceeds the average).
    return min(live, key=lambda w: loads.get(w, 0))


def routing_key(
    session_id: str | None,
    body: Mapping[str, object],
) -> str:
    """The prompt group a request belongs to, as the gateway sees it: the body's prompt_group,
    else the X-Session-ID header, else the prompt itself (text, token ids or messages), the
    same precedence the worker uses to name the group."""
    group = body.get("prompt_group")
    if isinstance(group, str) and group:
        return group
    if session_id:
        return session_id
    for field in ("prompt", "input_ids", "token_ids", "text", "messages"):
        value = body.get(field)
        if value is not None:
            return f"{field}:{value!r}"
    return ""
