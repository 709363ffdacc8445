from __future__ import annotations

from collections import Counter

import pytest

from service.routing import build_ring, capacity, pick_worker, routing_key

WORKERS = ["http://w0", "http://w1", "http://w2", "http://w3"]
KEYS = [f"group-{i}" for i in range(2000)]


def test_pick_is_deterministic_and_sticky() -> None:
    ring = build_ring(WORKERS)
    first = [pick_worker(ring, key) for key in KEYS]
    again = [pick_worker(build_ring(WORKERS), key) for key in KEYS]
    assert first == again
    assert set(first) == set(WORKERS)


def test_keys_spread_over_workers() -> None:
    ring = build_ring(WORKERS, vnodes=128)
    counts = Counter(pick_worker(ring, key) for key in KEYS)
    assert min(counts.values()) > len(KEYS) / len(WORKERS) * 0.6


def test_dead_worker_groups_move_and_nothing_else_moves() -> None:
    ring = build_ring(WORKERS)
    before = {key: pick_worker(ring, key) for key in KEYS}
    healthy = [w for w in WORKERS if w != "http://w1"]
    after = {key: pick_worker(ring, key, healthy=healthy) for key in KEYS}
    for key in KEYS:
        if before[key] == "http://w1":
            assert after[key] in healthy
        else:
            assert after[key] == before[key]  # minimal movement
    back = {key: pick_worker(ring, key, healthy=WORKERS) for key in KEYS}
    assert back == before


def test_adding_a_worker_moves_only_keys_to_it() -> None:
    small = build_ring(WORKERS[:3])
    big = build_ring(WORKERS)
    moved = 0
    for key in KEYS:
        old, new = pick_worker(small, key), pick_worker(big, key)
        if old != new:
            assert new == "http://w3"
            moved += 1
    assert 0 < moved < len(KEYS) / 2


def test_bounded_load_skips_an_overloaded_worker() -> None:
    ring = build_ring(WORKERS)
    key = KEYS[0]
    home = pick_worker(ring, key)
    assert home is not None
    # The home worker holds far more than (1 + eps) * average: the key goes elsewhere.
    loads = {w: 1 for w in WORKERS}
    loads[home] = 10
    other = pick_worker(ring, key, loads, eps=0.25)
    assert other is not None and other != home
    # Within the bound it stays home.
    loads[home] = 1
    assert pick_worker(ring, key, loads, eps=0.25) == home


def test_bounded_load_never_exceeds_the_capacity() -> None:
    ring = build_ring(WORKERS)
    loads = dict.fromkeys(WORKERS, 0)
    eps = 0.25
    for _ in range(400):  # one hot group: every request has the same key
        limit = capacity(sum(loads.values()), len(WORKERS), eps)
        worker = pick_worker(ring, "hot", loads, eps=eps)
        assert worker is not None
        assert loads[worker] < limit
        loads[worker] += 1
    assert max(loads.values()) <= (1 + eps) * 400 / len(WORKERS) + 1


def test_no_healthy_worker() -> None:
    ring = build_ring(WORKERS)
    assert pick_worker(ring, "g", healthy=[]) is None


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        build_ring(WORKERS, vnodes=0)
    with pytest.raises(ValueError):
        build_ring(["a", "a"])
    with pytest.raises(ValueError):
        pick_worker(build_ring(WORKERS), "g", eps=-1)
    with pytest.raises(ValueError):
        capacity(0, 0, 0.1)


def test_routing_key_precedence() -> None:
    assert routing_key("sess", {"prompt_group": "g", "prompt": "p"}) == "g"
    assert routing_key("sess", {"prompt": "p"}) == "sess"
    assert routing_key(None, {"prompt": [1, 2]}) == routing_key(None, {"prompt": [1, 2]})
    assert routing_key(None, {"input_ids": [1, 2]}) != routing_key(None, {"input_ids": [1, 3]})
    assert routing_key(None, {}) == ""
