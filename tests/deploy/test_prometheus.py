"""The dashboard against a real Prometheus that scraped a live service.

Real processes on loopback free ports, in temporary directories: a redis-server, `das worker` on
SmolLM2 (the embedded engine, DAS speculation, live siblings), `das gateway` in front of it, and
Debian's prometheus with the project's deploy/prometheus/prometheus.yml, its targets moved to
those ports and its interval to 1 s. A short workload (three chat prompts, two samples each,
three epochs at temperature 0, one request at a time so every length class grows over several
scrapes) goes through the gateway; then every PromQL of every dashboard panel must return a
finite value through /api/v1/query, and the main panels are drawn from the same data
(bench/dashboard_png.py; DAS_DASHBOARD_PNG=PATH keeps the picture, `make dashboard-png`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.dashboard_png import MAIN_PANELS, render
from drafter.draft import DRAFT_SOURCES
from tests.service.conftest import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Debian's prometheus package is not installed (.ci/run installs it)",
)

PROMPTS = (
    "List the planets of the solar system in order.",
    "Write the numbers from one to twenty in words.",
    "Name the days of the week.",
)
EPOCHS = 3
SAMPLES = 2  # per prompt: a GRPO-like group
MAX_TOKENS = 80  # enough for lengths to spread over the histogram's first buckets
DEADLINE_S = 300.0  # for anything to start or be scraped (a loaded CI machine)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/das-rollout.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_promtool_accepts_the_projects_config() -> None:
    if PROMTOOL is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    checked = subprocess.run(
        [PROMTOOL, "check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def local_config(gateway: str, worker: str) -> tuple[dict[str, Any], list[str]]:
    """The project's config with its targets on loopback (gateway -> gateway, worker-0 ->
    worker; the other workers dropped) and a 1 s interval; the targets dropped."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    moved = {"gateway:8000": gateway, "worker-0:8000": worker}
    dropped = []
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            dropped += [t for t in static["targets"] if t not in moved]
            static["targets"] = [moved[t] for t in static["targets"] if t in moved]
    return config, dropped


@dataclass
class Stack:
    gateway: str
    prometheus: str
    started: float  # unix time the workload began
    requests: int


def wait_until(what: str, check: Any, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: gave up after {DEADLINE_S} s")
        time.sleep(0.25)


def scalar(prometheus: str, expr: str) -> float | None:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    reply.raise_for_status()  # 503 until Prometheus is ready: wait_until retries
    values = reply.json()["data"]["result"]
    return float(values[0]["value"][1]) if values else None


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus package is not installed (.ci/run installs it)")
    tmp = tmp_path_factory.mktemp("stack")
    redis = RedisServer(tmp)
    redis.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        worker_port, gateway_port, prometheus_port = free_port(), free_port(), free_port()
        das = [sys.executable, "-m", "service.cli"]
        worker = start(
            [*das, "worker", "--port", str(worker_port), "--worker-id", "worker-0",
             "--redis-url", redis.url, "--cost-model", "smollm2-cpu", "--max-model-len", "512"],
            tmp / "worker.log",
        )  # fmt: skip
        processes.append(worker)
        worker_url = f"http://127.0.0.1:{worker_port}"
        wait_until("das worker", lambda: httpx.get(f"{worker_url}/health").is_success, worker)
        gateway = start(
            [*das, "gateway", "--port", str(gateway_port), "--worker", worker_url],
            tmp / "gateway.log",
        )
        processes.append(gateway)
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_until("das gateway", lambda: httpx.get(f"{gateway_url}/health").is_success, gateway)

        config, dropped = local_config(f"127.0.0.1:{gateway_port}", f"127.0.0.1:{worker_port}")
        assert dropped == ["worker-1:8000"]
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = start(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
            tmp / "prometheus.log",
        )  # fmt: skip
        processes.append(prometheus)
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        wait_until(
            "Prometheus scrapes both targets",
            lambda: scalar(prometheus_url, 'sum(up{job=~"das-.*"})') == 2,
            prometheus,
        )

        started = time.time()
        requests = 0
        with httpx.Client(base_url=gateway_url, timeout=DEADLINE_S) as client:
            for epoch in range(EPOCHS):
                for prompt in PROMPTS:
                    body = {"messages": [{"role": "user", "content": prompt}], "n": SAMPLES,
                            "max_tokens": MAX_TOKENS, "temperature": 0, "seed": epoch}  # fmt: skip
                    reply = client.post("/v1/chat/completions", json=body)
                    assert reply.status_code == 200, reply.text
                    requests += 1
                    finished = requests * SAMPLES
                    wait_until(  # the next one grows the counters past this scrape
                        "Prometheus sees the finished samples",
                        lambda n=finished: scalar(
                            prometheus_url, "sum(das_samples_finished_total)"
                        ) == n,
                        prometheus,
                    )  # fmt: skip
        served = 'sum(das_requests_total{job="das-gateway", endpoint="/v1/chat/completions"})'
        wait_until(
            "Prometheus sees the gateway's requests",
            lambda: scalar(prometheus_url, served) == requests,
            prometheus,
        )
        yield Stack(gateway_url, prometheus_url, started, requests)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        redis.stop()


@pytest.mark.slow
@needs_prometheus
def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 25
    empty = []
    for title, expr in queries:
        reply = httpx.get(f"{stack.prometheus}/api/v1/query", params={"query": expr}, timeout=30)
        body = reply.json()
        assert body["status"] == "success", (title, expr, body)
        values = [float(item["value"][1]) for item in body["data"]["result"]]
        if not any(math.isfinite(value) for value in values):
            empty.append((title, expr, values))
    assert not empty, empty


@pytest.mark.slow
@needs_prometheus
def test_the_workload_shows_speedup_in_prometheus(stack: Stack) -> None:
    """What the picture should show: drafts accepted on the repeated prompts (more than one
    token per target forward), every sample counted once by the length class predicted for
    it, more than one class (a group's first epoch has no history: medium), and drafts from
    each source (the worker runs with live siblings)."""
    speedup = scalar(
        stack.prometheus,
        "sum(das_generated_tokens_total) / sum(das_forward_passes_total)",
    )
    assert speedup is not None and speedup > 1.0
    classes = httpx.get(
        f"{stack.prometheus}/api/v1/query",
        params={"query": "sum by (length_class) (das_generation_length_tokens_count)"},
        timeout=10,
    ).json()["data"]["result"]
    counts = {item["metric"]["length_class"]: float(item["value"][1]) for item in classes}
    assert sum(counts.values()) == EPOCHS * len(PROMPTS) * SAMPLES
    assert "medium" in counts and len(counts) >= 2, counts
    # Drafts came from every source (other groups' rollouts only where nothing else matched:
    # maybe never), and the by-source counts add up to the totals.
    drafted = by_source(stack.prometheus, "das_source_drafted_tokens_total")
    accepted = by_source(stack.prometheus, "das_source_accepted_tokens_total")
    assert {"history", "siblings", "context"} <= set(drafted) <= set(DRAFT_SOURCES), drafted
    assert sum(drafted.values()) == scalar(stack.prometheus, "sum(das_drafted_tokens_total)")
    assert sum(accepted.values()) == scalar(stack.prometheus, "sum(das_accepted_tokens_total)")
    assert accepted["history"] > 0, accepted


def by_source(prometheus: str, metric: str) -> dict[str, float]:
    result = httpx.get(
        f"{prometheus}/api/v1/query", params={"query": f"sum by (source) ({metric})"}, timeout=10
    ).json()["data"]["result"]
    return {item["metric"]["source"]: float(item["value"][1]) for item in result}


@pytest.mark.slow
@needs_prometheus
def test_the_main_panels_render_from_prometheus(stack: Stack, tmp_path: Path) -> None:
    out = Path(os.environ.get("DAS_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    shown = render(stack.prometheus, out, stack.started - 5, time.time())
    assert list(shown) == list(MAIN_PANELS)
    assert all(count > 0 for count in shown.values()), shown
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
