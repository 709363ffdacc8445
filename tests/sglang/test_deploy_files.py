"""The SGLang worker's image and compose service agree with the plugin's pin and settings
(parsed only: no Docker engine runs here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from drafter.cost import parse_cost_model
from service.sglang_plugin.config import sglang_cost_model

ROOT = Path(__file__).resolve().parents[2]


def pinned_sglang() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = project["optional-dependencies"]["sglang"]
    assert project["entry-points"]["sglang.srt.plugins"] == {
        "das": "service.sglang_plugin:register"
    }
    return str(pin.removeprefix("sglang=="))


def test_the_image_is_sglangs_official_one_at_the_pinned_version() -> None:
    dockerfile = (ROOT / "docker" / "sglang-worker.Dockerfile").read_text()
    version = pinned_sglang()
    assert re.search(rf"^FROM lmsysorg/sglang:v{re.escape(version)}$", dockerfile, re.M)
    assert f"assert v == '{version}'" in dockerfile  # the build refuses another sglang
    assert '"--backend", "sglang"' in dockerfile


def test_the_compose_services_run_our_launcher_with_a_gpu_cost_model() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = {
        name: service
        for name, service in compose["services"].items()
        if "gpu-sglang" in service.get("profiles", []) and service["command"][0] == "worker"
    }
    assert sorted(services) == ["sglang-worker-0", "sglang-worker-1"]
    gpus = []
    for service in services.values():
        assert service["build"]["dockerfile"] == "docker/sglang-worker.Dockerfile"
        assert service["command"][:3] == ["worker", "--backend", "sglang"]
        env = service["environment"]
        cost = re.fullmatch(r"\$\{DAS_SGLANG_COST_MODEL:-(.+)\}", env["DAS_COST_MODEL"])
        assert cost is not None
        assert sglang_cost_model(cost.group(1)) == parse_cost_model(cost.group(1))
        assert env["DAS_REDIS_URL"].startswith("redis://redis:")
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        gpus += device["device_ids"]
    assert sorted(gpus) == ["0", "1"]  # a GPU of its own each
