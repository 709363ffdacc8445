"""Deployment configuration: the one source of service settings, flags and DAS_* environment.

Every field is one DAS_<FIELD> environment variable and one command-line flag, which
service/commands.py derives from the field: its name, type, default and help (the field's
description); the Flag beside the type says which commands take it. Flags are passed as
keyword arguments and win over the environment; the environment wins over the defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from drafter.config import DrafterConfig
from drafter.cost import H100_7B, SMOLLM2_CPU, CostModel, parse_cost_model
from drafter.policy_spec import parse_policy_spec

Role = Literal["process", "worker", "gateway"]


@dataclass(frozen=True, slots=True)
class Flag:
    """A field's command-line flag. role: process flags belong to every command, worker flags
    to `das serve` and `das worker`, gateway flags to `das gateway`. name: the flag where it
    is not the field's name in kebab case less a trailing "-s" (seconds), nor, for a bool,
    --no-NAME (default True) or --NAME (default False). metavar: the value in --help."""

    role: Role
    name: str | None = None
    metavar: str | None = None


PROCESS = Flag("process")
WORKER = Flag("worker")
GATEWAY = Flag("gateway")


def _ms(cost: CostModel) -> str:
    return f"c_base {cost.c_base * 1e3:g} ms, c_tok {cost.c_tok * 1e3:g} ms"


_COST_MODEL_HELP = (
    "the cost model pricing a forward pass: calibrate (time the engine's own verify step at "
    f"start-up), smollm2-cpu (SmolLM2-135M on the 2-core development CPU, {_ms(SMOLLM2_CPU)}), "
    f"h100-7b (a 7B model on one H100, projected: {_ms(H100_7B)}) or C_BASE,C_TOK (seconds "
    "per forward pass, and per token in it)"
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DAS_", extra="forbid", frozen=True)

    # -- process ----------------------------------------------------------------------
    host: Annotated[str, PROCESS] = Field("127.0.0.1", description="address to listen on")
    port: Annotated[int, PROCESS] = Field(
        8000, ge=0, le=65535, description="port to listen on (0: a free one)"
    )
    api_key: Annotated[str | None, PROCESS] = Field(
        None, description="Bearer key required on every endpoint but /health and /metrics"
    )
    client_api_keys: Annotated[list[str], Flag("process", name="--client-api-key")] = Field(
        default_factory=list,
        description="another Bearer key accepted wherever --api-key is: one per client (a "
        "trainer, an evaluation job), each with its own --max-inflight-samples-per-key budget "
        "at the gateway; repeat the flag for each (DAS_CLIENT_API_KEYS: a JSON list)",
    )
    admin_api_key: Annotated[str | None, PROCESS] = Field(
        None,
        description="Bearer key required on the control endpoints (abort, pause, continue, "
        "weight updates, flush cache), where the API key is then refused; it is accepted "
        "everywhere the API key is (default: the API key guards the control endpoints too)",
    )
    log_level: Annotated[Literal["debug", "info", "warning", "error"], PROCESS] = Field(
        "warning", description="log level"
    )
    max_body_bytes: Annotated[int, PROCESS] = Field(
        16 * 2**20,
        ge=1024,
        description="bytes of one request body; a larger one is answered 413 before it is read",
    )

    # -- worker -----------------------------------------------------------------------
    backend: Annotated[Literal["engine", "vllm", "sglang"], WORKER] = Field(
        "engine",
        description="what serves the model: engine (the embedded torch engine, or the "
        "FakeWorker for --model fake), vllm, or sglang (`das worker` only: an SGLang server "
        "with our drafts through its NGRAM verify path; arguments after -- go to SGLang)",
    )
    model: Annotated[str, WORKER] = Field(
        "smollm2-135m",
        description="the embedded engine's model: smollm2-135m (the packaged GGUF), "
        "tiny-random, a model directory or a .gguf file; fake: the deterministic FakeWorker, "
        "no model at all",
    )
    served_model_name: Annotated[str | None, WORKER] = Field(
        None, description="the model name clients send (default: the model)"
    )
    device: Annotated[str, WORKER] = Field("cpu", description="cpu, cuda or cuda:N")
    dtype: Annotated[Literal["float32", "bfloat16", "float16"], WORKER] = Field(
        "float32", description="engine weights and activations"
    )
    speculation: Annotated[bool, WORKER] = Field(
        True,
        description="speculative decoding; off: no drafts at all, whatever the speculation "
        "policy says",
    )
    spec_policy: Annotated[str, Flag("worker", metavar="POLICY")] = Field(
        "das",
        description="the speculation budget policy: das, das-rate, das-eq7, fixed:K, suffix "
        "or none",
    )
    cost_model: Annotated[str, Flag("worker", metavar="COST_MODEL")] = Field(
        "calibrate", description=_COST_MODEL_HELP
    )
    spec_budget: Annotated[int, WORKER] = Field(
        8, ge=0, le=64, description="FakeWorker: draft tokens per forward pass"
    )
    max_batch: Annotated[int, WORKER] = Field(
        16, ge=1, description="engine: sequences decoding at once (KV cache slots)"
    )
    max_model_len: Annotated[int, WORKER] = Field(
        1024, ge=2, description="engine: prompt + output tokens of one sequence"
    )
    deterministic: Annotated[bool, WORKER] = Field(
        False,
        description="batch-invariant engine numerics: logits bitwise independent of batch "
        "and drafts (bitwise lossless speculation, slower)",
    )
    tree_drafts: Annotated[bool, WORKER] = Field(
        False,
        description="engine: best-first tree drafts instead of chains, verified under a tree "
        "attention mask (lossless; with --deterministic each tree's most probable path is "
        "verified as a chain)",
    )
    worker_id: Annotated[str | None, WORKER] = Field(
        None, description="names this worker in metrics and Redis (default: host:port)"
    )
    fake_step_delay_s: Annotated[float, WORKER] = Field(
        0.0, ge=0.0, description="FakeWorker: seconds of sleep per forward pass"
    )

    # -- limits (a worker's) --------------------------------------------------------------
    max_prompts_per_request: Annotated[int, WORKER] = Field(
        256, ge=1, description="prompts in one request (a batch); more: 400"
    )
    max_n: Annotated[int, WORKER] = Field(
        128, ge=1, description="samples per prompt (n, best_of) in one request; more: 400"
    )
    max_stop_strings: Annotated[int, WORKER] = Field(
        16, ge=0, description="stop strings in one request; more: 400"
    )
    max_stop_chars: Annotated[int, WORKER] = Field(
        1024, ge=1, description="characters of one stop string; more: 400"
    )
    max_inflight_samples: Annotated[int, WORKER] = Field(
        4096,
        ge=1,
        description="samples (n for each prompt) a worker holds at once, running or queued; a "
        "request that would exceed it is answered 429 with Retry-After",
    )

    # -- history (a worker's) -----------------------------------------------------------
    redis_url: Annotated[str | None, Flag("worker", metavar="URL")] = Field(
        None,
        description="share the rollout history through this Redis (default: the history "
        "lives in this process only)",
    )
    history_window: Annotated[int, WORKER] = Field(
        8, ge=1, description="policy versions of rollouts kept per prompt group"
    )
    history_max_rollouts_per_group: Annotated[int, WORKER] = Field(
        64, ge=1, description="newest rollouts kept per prompt group, whatever their version"
    )
    history_max_groups: Annotated[int, WORKER] = Field(
        8192,
        ge=1,
        description="prompt groups kept; past it the least recently used idle group is dropped",
    )
    history_live_siblings: Annotated[bool, WORKER] = Field(
        True,
        description="draft from the outputs so far of a prompt group's running requests too "
        "(GRPO samples of one prompt decode together), not only from its finished rollouts; "
        "off: finished rollouts only",
    )
    history_other_groups: Annotated[bool, WORKER] = Field(
        False,
        description="where neither a request's prompt group nor its own text has a match, draft "
        "from the stored rollouts of every group (they are held twice: once more in one tree "
        "of all groups)",
    )
    history_extend_threads: Annotated[int, WORKER] = Field(
        1,
        ge=0,
        le=8,
        description="threads that grow a verify step's suffix trees: 1, the engine's own; 0, "
        "one per CPU (at most 8) once a step appends 256 tree tokens (for a GPU worker with "
        "idle cores; on a CPU engine, right after torch's ops, it was no faster or slower)",
    )
    history_buffer_size: Annotated[int, WORKER] = Field(
        10_000, ge=1, description="rollouts held for Redis while it is down"
    )
    history_sync_interval_s: Annotated[float, WORKER] = Field(
        0.05, gt=0.0, description="seconds between Redis flushes and polls"
    )
    redis_timeout_s: Annotated[float, WORKER] = Field(
        0.5, gt=0.0, description="seconds a Redis call may take"
    )
    history_close_timeout_s: Annotated[float, WORKER] = Field(
        10.0,
        ge=0.0,
        description="at shutdown, seconds to keep retrying the flush of buffered rollouts while "
        "Redis is down; what is left then is logged and counted as dropped",
    )

    # -- gateway ----------------------------------------------------------------------
    worker_urls: Annotated[list[str], Flag("gateway", name="--worker", metavar="URL")] = Field(
        default_factory=list,
        description="a worker's base URL; repeat the flag for each worker (DAS_WORKER_URLS: "
        "a JSON list)",
    )
    sglang_worker_urls: Annotated[
        list[str], Flag("gateway", name="--sglang-worker", metavar="URL")
    ] = Field(
        default_factory=list,
        description="an SGLang worker's base URL (`das worker --backend sglang`), routed like "
        "--worker; the prompt group goes to it as custom_params and control calls map onto "
        "SGLang's; repeat the flag for each (DAS_SGLANG_WORKER_URLS: a JSON list)",
    )
    worker_api_key: Annotated[str | None, GATEWAY] = Field(
        None, description="Bearer key the gateway sends to its workers"
    )
    worker_admin_api_key: Annotated[str | None, GATEWAY] = Field(
        None,
        description="Bearer key the gateway sends to its workers on control calls (default: "
        "the worker API key)",
    )
    routing_load_factor: Annotated[float, Flag("gateway", name="--load-factor")] = Field(
        0.25,
        ge=0.0,
        description="bounded-load routing: a worker takes at most (1 + this) x the average load",
    )
    routing_vnodes: Annotated[int, GATEWAY] = Field(
        64, ge=1, description="points per worker on the consistent-hash ring"
    )
    health_interval_s: Annotated[float, GATEWAY] = Field(
        1.0, gt=0.0, description="seconds between health checks of every worker"
    )
    health_failures: Annotated[int, GATEWAY] = Field(
        2, ge=1, description="consecutive failed health checks that take a worker out"
    )
    control_timeout_s: Annotated[float, GATEWAY] = Field(
        10.0,
        gt=0.0,
        description="seconds a control call (pause, continue, abort, flush, versions) may take "
        "on one worker; one that does not answer is taken out of routing and reported (weight "
        "updates take --upstream-timeout)",
    )
    max_inflight_samples_per_key: Annotated[int | None, GATEWAY] = Field(
        None,
        ge=1,
        description="samples (n for each prompt) one API key (--api-key, each --client-api-key, "
        "the admin key; without keys, all callers together) may have running or queued "
        "through the gateway at once; over it, 429 with Retry-After (default: no per-key "
        "limit, only each worker's --max-inflight-samples)",
    )
    catch_up_max_backoff_s: Annotated[float, GATEWAY] = Field(
        60.0,
        gt=0.0,
        description="a worker on another policy version than the gateway announces is sent "
        "the last weight update again, set to that version; after a failure the next try "
        "waits --health-interval, doubled per failure, at most this many seconds",
    )
    upstream_timeout_s: Annotated[float, GATEWAY] = Field(
        600.0, gt=0.0, description="seconds a request to a worker may take"
    )

    @field_validator("spec_policy")
    @classmethod
    def _known_policy(cls, spec: str) -> str:
        parse_policy_spec(spec)  # ValueError (a validation error) for an unknown policy
        return spec.strip()

    @field_validator("cost_model")
    @classmethod
    def _known_cost_model(cls, spec: str) -> str:
        parse_cost_model(spec)  # ValueError for an unknown name or bad seconds
        return spec.strip().lower()

    @field_validator("worker_urls", "sglang_worker_urls")
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

    def drafter_config(self) -> DrafterConfig:
        """The rollout history's knobs (the history_* settings), as every worker takes them."""
        return DrafterConfig(
            window=self.history_window,
            max_rollouts_per_group=self.history_max_rollouts_per_group,
            max_groups=self.history_max_groups,
            live_siblings=self.history_live_siblings,
            other_groups=self.history_other_groups,
            extend_threads=self.history_extend_threads,
        )
