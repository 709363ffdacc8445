"""Gateway overhead: requests/s and latency through the gateway versus straight to a worker.

Starts a FakeWorker (`das worker --model fake`) and a gateway in front of it as separate
processes, then drives both with a minimal keep-alive HTTP/1.1 load generator (raw asyncio
streams, so the client costs little next to what is measured) at several concurrencies.
Requests are small /v1/completions (16 tokens, greedy) spread over 64 prompt groups.
Prints a table and writes JSON; no timing is asserted.

    .venv/bin/python bench/gateway.py --json bench/results/gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def launch(command: str, args: list[str]) -> subprocess.Popen[bytes]:
    code = f"import sys; from service.commands import {command}; sys.exit({command}(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if b" 200 " in sock.recv(256):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}")


def request_bytes(group: int, max_tokens: int) -> bytes:
    body = json.dumps(
        {
            "model": "fake",
            "prompt": f"Question {group}: what is {group} + {group}?",
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    ).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"X-Session-ID: g{group}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def drive(port: int, concurrency: int, duration: float, max_tokens: int) -> dict[str, Any]:
    payloads = [request_bytes(g, max_tokens) for g in range(64)]
    latencies: list[float] = []
    errors = 0
    stop_at = 0.0

    async def connection(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = index
        try:
            while time.perf_counter() < stop_at:
                payload = payloads[i % len(payloads)]
                i += concurrency
                started = time.perf_counter()
                writer.write(payload)
                status = await read_response(reader)
                latencies.append(time.perf_counter() - started)
                errors += status != 200
        finally:
            writer.close()

    # Warm up (connections, caches), then measure.
    stop_at = time.perf_counter() + 0.5
    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    latencies.clear()
    errors = 0
    started = time.perf_counter()
    stop_at = started + duration
    await asyncio.gather(*(connection(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "errors": errors,
        "rps": len(ordered) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = parser.parse_args(argv)

    worker_port, gateway_port = free_port(), free_port()
    worker = launch("worker", ["--model", "fake", "--port", str(worker_port), "--log-level",
                               "error"])  # fmt: skip
    gateway = None
    try:
        wait_ready(worker_port)
        gateway = launch("gateway", ["--worker", f"http://127.0.0.1:{worker_port}", "--port",
                                     str(gateway_port), "--log-level", "error"])  # fmt: skip
        wait_ready(gateway_port)
        rows = []
        for concurrency in args.concurrency:
            direct = asyncio.run(drive(worker_port, concurrency, args.duration, args.max_tokens))
            routed = asyncio.run(drive(gateway_port, concurrency, args.duration, args.max_tokens))
            rows.append(
                {
                    "concurrency": concurrency,
                    "direct": direct,
                    "gateway": routed,
                    "added_p50_ms": routed["p50_ms"] - direct["p50_ms"],
                    "added_p99_ms": routed["p99_ms"] - direct["p99_ms"],
                }
            )
    finally:
        for process in (gateway, worker):
            if process is not None:
                process.terminate()
                process.wait(timeout=10)

    print(
        f"{'conc':>4} | {'direct rps':>10} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'gateway rps':>11} {'p50 ms':>7} {'p99 ms':>7} | {'added p50':>9} {'added p99':>9}"
    )
    for row in rows:
        d, g, c = row["direct"], row["gateway"], row["concurrency"]
        print(
            f"{c:>4} | {d['rps']:>10.0f} {d['p50_ms']:>7.2f} {d['p99_ms']:>7.2f} | "
            f"{g['rps']:>11.0f} {g['p50_ms']:>7.2f} {g['p99_ms']:>7.2f} | "
            f"{row['added_p50_ms']:>9.2f} {row['added_p99_ms']:>9.2f}"
        )
    errors = sum(row["direct"]["errors"] + row["gateway"]["errors"] for row in rows)
    if errors:
        print(f"non-200 responses: {errors}")
    result = {
        "benchmark": "gateway",
        "cpus": os.cpu_count(),
        "max_tokens": args.max_tokens,
        "duration_s": args.duration,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
