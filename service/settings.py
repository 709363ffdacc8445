"""Deployment configuration: the one source of service settings (flags and DAS_* environment).

Command-line flags are passed as keyword arguments and win over the environment; the
environment wins over the defaults here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from drafter.policy_spec import parse_policy_spec


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DAS_", extra="forbid", frozen=True)

    # -- process ----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: pick a free port (tests)
    api_key: str | None = None  # Bearer key required on every endpoint but /health, /metrics
    log_level: Literal["debug", "info", "warning", "error"] = "warning"

    # -- worker -----------------------------------------------------------------------
    # The embedded engine's model: "smollm2-135m" (packaged GGUF), "tiny-random", a model
    # directory or a .gguf file; "fake": the deterministic FakeWorker, no model at all.
    model: str = "smollm2-135m"
    served_model_name: str | None = None  # the name clients send (default: model)
    device: str = "cpu"  # cpu, cuda or cuda:N
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    speculation: bool = True  # False: no drafts at all, whatever spec_policy says
    spec_policy: str = "das"  # engine budget policy: das, das-eq7, fixed:K or none
    spec_budget: int = Field(8, ge=0, le=64)  # FakeWorker: draft tokens per forward pass
    max_batch: int = Field(16, ge=1)  # engine: sequences decoding at once (KV cache slots)
    max_model_len: int = Field(1024, ge=2)  # engine: prompt + output tokens of one sequence
    deterministic: bool = False  # engine: batch-invariant numerics (bitwise lossless, slower)
    worker_id: str | None = None  # names this worker in metrics and Redis (default: host:port)
    fake_step_delay_s: float = Field(0.0, ge=0.0)  # FakeWorker: sleep per forward pass

    # -- history ----------------------------------------------------------------------
    redis_url: str | None = None  # None: the history lives in this process only
    history_window: int = Field(4, ge=1)  # policy versions of rollouts kept
    history_max_rollouts_per_group: int = Field(64, ge=1)
    history_buffer_size: int = Field(10_000, ge=1)  # rollouts held while Redis is down
    history_sync_interval_s: float = Field(0.05, gt=0.0)  # Redis flush and poll period
    redis_timeout_s: float = Field(0.5, gt=0.0)

    # -- gateway ----------------------------------------------------------------------
    worker_urls: list[str] = Field(default_factory=list)
    worker_api_key: str | None = None  # key the gateway sends to its workers
    routing_load_factor: float = Field(0.25, ge=0.0)  # bounded load: (1 + eps) * average
    routing_vnodes: int = Field(64, ge=1)
    health_interval_s: float = Field(1.0, gt=0.0)
    health_failures: int = Field(2, ge=1)  # consecutive failed checks that remove a worker
    upstream_timeout_s: float = Field(600.0, gt=0.0)

    @field_validator("spec_policy")
    @classmethod
    def _known_policy(cls, spec: str) -> str:
        parse_policy_spec(spec)  # ValueError (a validation error) for an unknown policy
        return spec.strip()

    @field_validator("worker_urls")
    @classmethod
    def _strip_slashes(cls, urls: list[str]) -> list[str]:
        return [url.rstrip("/") for url in urls]

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def speculation_policy(self) -> str:
        """The engine's budget policy: spec_policy, or none without speculation."""
        return self.spec_policy if self.speculation else "none"

    @property
    def worker_name(self) -> str:
        return self.worker_id or f"{self.host}:{self.port}"
