"""Soak: mixed streaming, whole and aborted requests through the gateway, with a worker
restarted (SIGTERM, then started again on its port) in the middle.

Two FakeWorkers (`das worker --model fake`, a small step delay so requests overlap) behind a
gateway, all separate processes. Each request is whole, streamed, or aborted by the client
(`/abort_request` for its X-Request-Id while it runs); a completion that was not aborted and
did not come back whole (status 200, a finish_reason for every choice, a streamed one ending
with [DONE]) is lost. Prints a table and writes JSON; RSS of every process at the start and
the end. No timing is asserted.

    .venv/bin/python -m bench.soak --requests 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.gateway import free_port, launch, wait_ready

ROOT = Path(__file__).resolve().parent.parent


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_worker(port: int, delay: float) -> subprocess.Popen[bytes]:
    flags = ["--model", "fake", "--port", str(port), "--fake-step-delay", str(delay)]
    process = launch("worker", [*flags, "--worker-id", f"w{port}"])
    wait_ready(port)
    return process


async def one(
    http: httpx.AsyncClient, i: int, kind: str, tally: dict[str, int], why: list[str]
) -> None:
    rid = f"soak-{i}-{uuid.uuid4().hex[:6]}"
    body: dict[str, Any] = {
        "prompt": f"soak prompt {i % 97}",
        "max_tokens": 48,
        "n": 1 + i % 3,
        "seed": i,
        "prompt_group": f"g{i % 97}",
    }
    headers = {"x-request-id": rid}
    try:
        if kind == "stream":
            async with http.stream(
                "POST", "/v1/completions", json={**body, "stream": True}, headers=headers
            ) as response:
                lines = [line async for line in response.aiter_lines() if line]
            finished = sum('"finish_reason":"' in line for line in lines)
            ok = response.status_code == 200 and lines[-1] == "data: [DONE]"
            ok = ok and finished == body["n"]
            detail = f"stream {response.status_code}: {lines[-1][:160] if lines else ''}"
        elif kind == "whole":
            response = await http.post("/v1/completions", json=body, headers=headers)
            choices = response.json().get("choices", []) if response.status_code == 200 else []
            ok = len(choices) == body["n"] and all(c["finish_reason"] for c in choices)
            detail = f"whole {response.status_code}: {response.text[:160]}"
        else:  # aborted by its client while it runs: whatever comes back is fine
            request = asyncio.ensure_future(
                http.post("/v1/completions", json={**body, "max_tokens": 400}, headers=headers)
            )
            await asyncio.sleep(0.05)
            await http.post("/abort_request", json={"rid": rid})
            await request
            tally["aborted"] += 1
            return
    except httpx.HTTPError as error:
        ok, detail = False, f"{kind}: {type(error).__name__}"
    tally["completed" if ok else "lost"] += 1
    if not ok:
        why.append(detail)


async def drive(
    url: str,
    requests: int,
    concurrency: int,
    restart: Any,
    why: list[str],
    sample: Callable[[int], None],
    every: int,
) -> dict[str, int]:
    """Run the requests; sample(done) every `every` requests done (the RSS curve)."""
    tally = {"completed": 0, "lost": 0, "aborted": 0}
    done = 0
    kinds = ["whole", "stream", "whole", "stream", "abort"]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:

        async def runner() -> None:
            nonlocal done
            while not queue.empty():
                i = queue.get_nowait()
                if i == requests // 2:
                    await asyncio.to_thread(restart)
                await one(http, i, kinds[i % len(kinds)], tally, why)
                done += 1
                if every and done % every == 0:
                    sample(done)

        await asyncio.gather(*(runner() for _ in range(concurrency)))
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--step-delay", type=float, default=0.002)
    parser.add_argument(
        "--rss-every", type=int, default=0, help="record every process's RSS every N requests"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    ports = [free_port(), free_port()]
    workers = [start_worker(port, args.step_delay) for port in ports]
    gateway_port = free_port()
    worker_flags = [flag for port in ports for flag in ("--worker", f"http://127.0.0.1:{port}")]
    gateway = launch(
        "gateway", ["--port", str(gateway_port), "--health-interval", "0.2", *worker_flags]
    )
    wait_ready(gateway_port)
    processes = {"gateway": gateway, "worker-0": workers[0], "worker-1": workers[1]}
    rss_start = {name: rss_mb(p.pid) for name, p in processes.items()}

    def restart() -> None:  # SIGTERM worker-1 (it drains), then start it again on its port
        workers[1].send_signal(signal.SIGTERM)
        workers[1].wait(timeout=120)
        workers[1] = processes["worker-1"] = start_worker(ports[1], args.step_delay)

    curve: list[dict[str, float]] = []

    def sample(done: int) -> None:
        curve.append({"requests": done, **{n: rss_mb(p.pid) for n, p in processes.items()}})

    started = time.perf_counter()
    why: list[str] = []
    try:
        url = f"http://127.0.0.1:{gateway_port}"
        tally = asyncio.run(
            drive(url, args.requests, args.concurrency, restart, why, sample, args.rss_every)
        )
        elapsed = time.perf_counter() - started
        rss_end = {name: rss_mb(p.pid) for name, p in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    result = {
        "benchmark": "soak",
        "cpus": os.cpu_count(),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "seconds": elapsed,
        **tally,
        "rss_mb_start": rss_start,
        "rss_mb_end": rss_end,
        "rss_mb_curve": curve,
        "lost_examples": why[:10],
    }
    print(f"{args.requests} requests at concurrency {args.concurrency} in {elapsed:.1f} s, "
          f"worker-1 restarted half-way: {tally['completed']} completed, {tally['lost']} lost, "
          f"{tally['aborted']} aborted")  # fmt: skip
    for name in processes:
        print(f"  {name}: RSS {rss_start[name]:.0f} -> {rss_end[name]:.0f} MB")
    for point in curve:
        row = ", ".join(f"{n} {point[n]:.0f}" for n in processes)
        print(f"  after {point['requests']:.0f} requests: RSS MB {row}")
    for detail in why[:10]:
        print(f"  lost: {detail}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if tally["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
