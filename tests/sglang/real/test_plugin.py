"""SGLang's own plugin loader finds our entry point, and create_worker gives our worker class
only when DAS_SGLANG=1. load_plugins() runs once per process, so each case is a subprocess
(as SGLang's scheduler is: a spawned process that loads the installed plugins itself)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

STUBS = Path(__file__).resolve().parent.parent / "stubs"

PROBE = f"""
import transformers.utils.import_utils as imports
imports.is_torchvision_available()
import sys
sys.path.insert(0, {str(STUBS)!r})
from types import SimpleNamespace
from sglang.srt.plugins import load_plugins, load_plugins_by_group
print("discovered", sorted(load_plugins_by_group("sglang.srt.plugins")))
load_plugins()
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
print("ngram", SpeculativeAlgorithm.from_string("NGRAM").create_worker(SimpleNamespace()).__name__)
"""


def probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DAS_SGLANG", "SGLANG_PLUGINS")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line.startswith(("discovered", "ngram"))]


@pytest.mark.parametrize(
    "env,worker",
    [({"DAS_SGLANG": "1"}, "DasNgramWorker"), ({}, "NGRAMWorker")],
    ids=["enabled", "unset"],
)
def test_load_plugins_finds_ours_and_create_worker_follows_the_switch(
    env: dict[str, str], worker: str
) -> None:
    assert probe(**env) == ["discovered ['das']", f"ngram {worker}"]
