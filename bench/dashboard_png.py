"""The Grafana dashboard's main panels, drawn from a Prometheus's data with matplotlib, so a
reviewer sees what Grafana would show without running Grafana.

    python -m bench.dashboard_png --prometheus http://127.0.0.1:9090 --out docs/dashboard.png \
        [--minutes 10] [--dashboard deploy/grafana/dashboards/das-rollout.json]

Each panel's PromQL is the dashboard's own, evaluated by Prometheus over the window with
query_range (the distribution panel: one instant query at the end, cumulative buckets turned
into counts per bucket). `make dashboard-png` renders docs/dashboard.png from the Prometheus of
tests/deploy/test_prometheus.py (a real one that scraped a live gateway and worker).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/das-rollout.json"

# The panels drawn, in order: what an RL engineer reads first.
MAIN_PANELS = (
    "Rollout tokens / s",
    "Speedup: tokens per target forward",
    "Decode time saved (cost-model estimate)",
    "Draft acceptance by predicted length class",
    "Draft acceptance by draft source",
    "Accepted draft tokens / s by draft source",
    "Generation length p50 / p90 / p99 (tokens)",
    "Generation length distribution (samples, 10 min)",
    "Running and queued requests",
    "History: tokens in the suffix trees",
    "Policy version per worker (and skew)",
    "Redis: rollouts synced and errors / s",
    "Workers up (gateway view)",
    "Gateway latency p50 / p99",
)


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    times: list[float]  # unix seconds
    values: list[float]


def panels_by_title(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {panel["title"]: panel for panel in dashboard["panels"] if panel.get("targets")}


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's {{label}} legend filled in from a series' labels."""
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"


def query_range(
    client: httpx.Client, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    reply = client.get(
        "/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}
    )
    reply.raise_for_status()
    body = reply.json()
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def query(client: httpx.Client, expr: str, at: float) -> list[dict[str, Any]]:
    reply = client.get("/api/v1/query", params={"query": expr, "time": at})
    reply.raise_for_status()
    body = reply.json()
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def panel_series(
    client: httpx.Client, panel: dict[str, Any], start: float, end: float, step: float
) -> list[Series]:
    series = []
    for target in panel["targets"]:
        for item in query_range(client, target["expr"], start, end, step):
            points = [(float(t), float(v)) for t, v in item["values"]]
            points = [(t, v) for t, v in points if math.isfinite(v)]
            if points:
                label = legend(target.get("legendFormat", ""), item["metric"])
                series.append(Series(label, [t for t, _ in points], [v for _, v in points]))
    return series


def bucket_counts(
    client: httpx.Client, panel: dict[str, Any], at: float
) -> list[tuple[str, float]]:
    """(upper bound, samples in that bucket) from the panel's cumulative bucket query."""
    (target,) = panel["targets"]
    cumulative = sorted(
        (float(item["metric"]["le"]), float(item["value"][1]))
        for item in query(client, target["expr"], at)
    )
    counts, below = [], 0.0
    for bound, total in cumulative:
        counts.append(("+Inf" if math.isinf(bound) else f"{bound:g}", max(total - below, 0.0)))
        below = total
    return counts


def render(
    prometheus: str,
    out: Path,
    start: float,
    end: float,
    dashboard_path: Path = DASHBOARD,
    titles: Sequence[str] = MAIN_PANELS,
) -> dict[str, int]:
    """Draw the panels to `out` (PNG); the number of series (or buckets) each one showed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_by_title(json.loads(dashboard_path.read_text()))
    missing = [title for title in titles if title not in panels]
    if missing:
        raise ValueError(f"not in the dashboard: {missing}")
    step = max(1.0, (end - start) / 240)
    columns = 3
    rows = math.ceil(len(titles) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.4 * rows))
    shown: dict[str, int] = {}
    with httpx.Client(base_url=prometheus, timeout=30) as client:
        for ax, title in zip(axes.flat, titles, strict=False):
            panel = panels[title]
            ax.set_title(title, fontsize=10)
            if panel["type"] == "bargauge":
                counts = bucket_counts(client, panel, end)
                ax.bar([bound for bound, _ in counts], [n for _, n in counts], color="tab:blue")
                ax.set_xlabel("tokens (bucket upper bound)", fontsize=8)
                ax.tick_params(axis="x", labelsize=7, rotation=45)
                shown[title] = sum(1 for _, n in counts if n > 0)
                continue
            series = panel_series(client, panel, start, end, step)
            for item in series:
                ax.plot([t - start for t in item.times], item.values, label=item.label)
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
            if unit == "percentunit":
                ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            ax.set_xlabel("seconds from the window's start", fontsize=8)
            ax.tick_params(labelsize=8)
            if series:
                ax.legend(fontsize=7, loc="best")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            shown[title] = len(series)
        for ax in list(axes.flat)[len(titles) :]:
            ax.axis("off")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(end))
    figure.suptitle(f"DAS rollout service: dashboard panels from Prometheus ({stamp})")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return shown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard_png", description=__doc__)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--minutes", type=float, default=10.0, help="the window drawn")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    args = parser.parse_args(argv)
    end = time.time()
    shown = render(args.prometheus, args.out, end - 60 * args.minutes, end, args.dashboard)
    for title, count in shown.items():
        print(f"{count:3d}  {title}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
