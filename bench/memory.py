"""Memory of one worker over a long run: bounded (history window, caches) or a leak?

A FakeWorker app (the real one: uvicorn, the routers, Generation, the history) served in this
process under tracemalloc, driven with bench.soak's mix (whole, streamed and client-aborted
requests over 97 prompt groups, n 1-3, 48 tokens) from the main thread. At each checkpoint:
RSS, the Python heap tracemalloc sees, the history's native trees (its own memory_bytes
count), rollouts and groups held, and the allocation sites that grew most since the last
checkpoint. The client's own allocations (httpx, this file) are left out of the sites.
`--part history`: the RolloutHistory alone, the same 97 groups of 48-token rollouts added far
past its bound (64 per group), to follow its native trees' memory to where it levels off.

    .venv/bin/python -m bench.memory --requests 20000 --every 4000
    .venv/bin/python -m bench.memory --part history --requests 300000 --every 30000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from bench.gateway import free_port
from bench.soak import one, rss_mb
from service.settings import Settings
from service.worker_app import create_app

ROOT = Path(__file__).resolve().parent.parent
_CLIENT = ("httpx", "httpcore", "h11", "anyio", "bench/", "tracemalloc")


def serve(port: int, delay: float) -> tuple[uvicorn.Server, threading.Thread, Any]:
    settings = {"model": "fake", "port": port, "fake_step_delay_s": delay, "worker_id": "m"}
    app = create_app(Settings.model_validate(settings))
    server = uvicorn.Server(
        uvicorn.Config(app, port=port, log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, app


def checkpoint(done: int, app: Any, previous: tracemalloc.Snapshot | None) -> dict[str, Any]:
    snapshot = tracemalloc.take_snapshot()
    worker = app.state.das.worker
    history = worker.history
    point: dict[str, Any] = {
        "requests": done,
        "rss_mb": round(rss_mb_self(), 1),
        "python_heap_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 1),
        "history_native_mb": round(history.memory_bytes() / 2**20, 1),
        "history_tokens": history.num_tokens(),
        "history_groups": len(history.groups()),
        "base_cache": len(worker._bases),
        "live_requests": history.active_requests(),
        "generation_active": len(app.state.das.generation._active),
        "grew": [],
    }
    if previous is not None:
        stats = snapshot.compare_to(previous, "lineno")
        server_side = [s for s in stats if not any(c in str(s.traceback) for c in _CLIENT)]
        point["grew"] = [
            {"site": str(s.traceback), "kb": round(s.size_diff / 1024, 1), "count": s.count_diff}
            for s in sorted(server_side, key=lambda s: -s.size_diff)[:6]
        ]
    point["_snapshot"] = snapshot
    return point


def rss_mb_self() -> float:
    import os

    return rss_mb(os.getpid())


async def drive(url: str, requests: int, every: int, app: Any) -> list[dict[str, Any]]:
    kinds = ["whole", "stream", "whole", "stream", "abort"]
    tally = {"completed": 0, "lost": 0, "aborted": 0}
    why: list[str] = []
    points: list[dict[str, Any]] = [checkpoint(0, app, None)]
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for start in range(0, requests, every):
            batch = range(start, min(start + every, requests))
            queue = list(batch)

            async def runner(queue: list[int]) -> None:
                while queue:
                    i = queue.pop()
                    await one(http, i, kinds[i % len(kinds)], tally, why)

            await asyncio.gather(*(runner(queue) for _ in range(32)))
            await asyncio.sleep(0.5)  # let aborted requests finish leaving
            points.append(checkpoint(batch.stop, app, points[-1].pop("_snapshot")))
            p = points[-1]
            print(
                f"{p['requests']:>6} requests: RSS {p['rss_mb']} MB, python heap "
                f"{p['python_heap_mb']} MB, history trees {p['history_native_mb']} MB "
                f"({p['history_tokens']} tokens, {p['history_groups']} groups), "
                f"live {p['live_requests']}, lost {tally['lost']}",
                flush=True,
            )
            for site in p["grew"][:3]:
                print(f"    +{site['kb']} KB ({site['count']:+d} blocks) {site['site']}")
    points[-1].pop("_snapshot", None)
    return points


def history_only(rollouts: int, every: int) -> list[dict[str, Any]]:
    import os

    import numpy as np

    from drafter import DrafterConfig, RolloutHistory

    history = RolloutHistory(DrafterConfig())
    rng = np.random.default_rng(0)
    bases = [rng.integers(97, 123, 48).astype(np.int32) for _ in range(97)]
    prompt = np.arange(14, dtype=np.int32)
    points = []
    for i in range(1, rollouts + 1):
        output = bases[i % 97].copy()
        deviate = rng.random(48) < 0.15  # the FakeWorker's deviation at temperature 1
        output[deviate] = rng.integers(97, 123, int(deviate.sum()))
        history.add_rollout(f"g{i % 97}", output, 0, prompt)
        if i % every == 0:
            point = {
                "rollouts": i,
                "rss_mb": round(rss_mb(os.getpid()), 1),
                "history_native_mb": round(history.memory_bytes() / 2**20, 1),
                "history_tokens": history.num_tokens(),
            }
            points.append(point)
            print(
                f"{i:>7} rollouts: RSS {point['rss_mb']} MB, history trees "
                f"{point['history_native_mb']} MB ({point['history_tokens']} tokens)",
                flush=True,
            )
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["worker", "history"], default="worker")
    parser.add_argument("--requests", type=int, default=20000, help="(history: rollouts)")
    parser.add_argument("--every", type=int, default=4000)
    parser.add_argument("--step-delay", type=float, default=0.002)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    args = parser.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.part == "history":
        points = history_only(args.requests, args.every)
        args.json.write_text(json.dumps({"benchmark": "memory-history", "points": points}) + "\n")
        print(f"wrote {args.json}")
        return 0
    tracemalloc.start(1)
    port = free_port()
    server, thread, app = serve(port, args.step_delay)
    try:
        points = asyncio.run(drive(f"http://127.0.0.1:{port}", args.requests, args.every, app))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    args.json.write_text(json.dumps({"benchmark": "memory", "points": points}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
