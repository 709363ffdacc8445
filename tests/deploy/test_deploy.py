"""The deployment files are parsed and cross-checked (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return data


def test_compose_has_the_whole_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {
        "redis", "worker-0", "worker-1", "worker-sglang", "gateway", "prometheus", "grafana"
    }  # fmt: skip
    for name in ("worker-0", "worker-1", "worker-sglang", "gateway"):
        build = services[name]["build"]
        dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile.is_file(), dockerfile
    for volume in services["prometheus"]["volumes"] + services["grafana"]["volumes"]:
        source = volume.split(":")[0]
        assert (DEPLOY / source).exists(), source
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            assert dependency in services, (name, dependency)


def test_each_worker_reserves_its_own_gpu(compose: dict[str, Any]) -> None:
    gpus = []
    for name in ("worker-0", "worker-1"):
        service = compose["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        gpus += device["device_ids"]
        assert service["environment"]["DAS_DEVICE"] == "cuda"
        assert service["environment"]["DAS_REDIS_URL"].startswith("redis://redis:")
        assert service["command"][0] == "worker"
    assert sorted(gpus) == ["0", "1"]


def test_gateway_routes_to_every_worker_and_prometheus_scrapes_them(
    compose: dict[str, Any],
) -> None:
    command = compose["services"]["gateway"]["command"]
    assert command[0] == "gateway"
    workers = [command[i + 1] for i, arg in enumerate(command) if arg == "--worker"]
    assert workers == ["http://worker-0:8000", "http://worker-1:8000"]
    prometheus = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets = {
        target
        for job in prometheus["scrape_configs"]
        for config in job["static_configs"]
        for target in config["targets"]
    }
    assert targets == {"gateway:8000", "worker-0:8000", "worker-1:8000"}


def test_dockerfiles_copy_what_exists_and_run_das() -> None:
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        lines = dockerfile.read_text().splitlines()
        assert lines[0].startswith("#") or any(line.startswith("FROM ") for line in lines)
        for line in lines:
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), (dockerfile.name, source)
        assert 'ENTRYPOINT ["das"]' in lines, dockerfile.name


def _exported_names(metrics: Metrics) -> set[str]:
    names: set[str] = set()
    for family in metrics.registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_dashboard_queries_only_metrics_the_service_exports() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "das-rollout.json").read_text())
    exported = _exported_names(Metrics())
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\bdas_[a-z_]+", target["expr"])
    }
    assert used, "the dashboard queries nothing"
    assert used <= exported, sorted(used - exported)
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "das.yml")
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    assert uids == {datasource["datasources"][0]["uid"]}
