"""The worker contract: what the API layer asks of a generation backend.

FakeWorker implements it now, the embedded torch engine (and the SGLang adapter) later. Every
request is a list of prompt token ids (chat messages are rendered with apply_chat_template
before this point) plus SamplingParams; the worker returns one SampleResult per sample, or
streams SampleDelta increments.

Errors are those of service.errors, raised where they happen: a request the worker cannot run
as sent is InvalidRequest, a worker that cannot take it now (shutting down, model not loaded)
Unavailable, and a failed engine step EngineFailure (its cause chained, for the log).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from service.errors import InvalidRequest
from service.protocol import MAX_TOP_LOGPROBS

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k
    seed: int | None = None  # None: the worker picks one and reports it per sample
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # the sampled tokens' logprobs (the target model's)
    top_logprobs: int = 0  # also the k most likely tokens at each position
    skip_special_tokens: bool = True
    no_stop_trim: bool = False  # keep the matched stop string / token in the text

    def __post_init__(self) -> None:
        if self.n < 1:  # its upper bound is the deployment's (service.limits)
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be >= 0")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    group: str | None = None  # explicit prompt group; None: a hash of prompt_token_ids

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must not be empty")
        if len(self.prompt_token_ids) == 0:
            raise ValueError("the prompt must not be empty")


@dataclass(slots=True)
class SpecCounters:
    forward_passes: int = 0  # target forward passes (verify steps) that produced tokens
    drafted_tokens: int = 0  # draft tokens proposed to the target
    accepted_tokens: int = 0  # draft tokens the target accepted
    # The same two by the tree each draft came from (drafter.draft.DRAFT_SOURCES).
    drafted_by_source: dict[str, int] = field(default_factory=dict)
    accepted_by_source: dict[str, int] = field(default_factory=dict)

    def add(self, other: SpecCounters) -> None:
        self.forward_passes += other.forward_passes
        self.drafted_tokens += other.drafted_tokens
        self.accepted_tokens += other.accepted_tokens
        for mine, theirs in (
            (self.drafted_by_source, other.drafted_by_source),
            (self.accepted_by_source, other.accepted_by_source),
        ):
            for source, tokens in theirs.items():
                mine[source] = mine.get(source, 0) + tokens


@dataclass(slots=True)
class SampleResult:
    index: int  # sample index within the request, 0 .. n-1
    token_ids: list[int]
    text: str
    logprobs: list[float] | None  # per output token, when params.logprobs
    top_logprobs: list[dict[int, float]] | None  # per output token, when params.top_logprobs
    finish_reason: FinishReason
    matched_stop: int | str | None  # the stop token id or string that ended it
    seed: int
    spec: SpecCounters
    group: str = ""
    weight_version: int = 0  # policy version that produced it
    length_class: str = "unknown"  # length class predicted from the group's history


@dataclass(slots=True)
class SampleDelta:
    """Tokens one sample gained since its previous delta; the last one has finish_reason."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: FinishReason | None
    matched_stop: int | str | None
    seed: int
    spec: SpecCounters  # cumulative for the sample so far
    weight_version: int = 0
    length_class: str = "unknown"


class Worker(Protocol):
    @property
    def model_name(self) -> str: ...
    @property
    def weight_version(self) -> int: ...
    @property
    def paused(self) -> bool: ...
    def load(self) -> tuple[int, int]:
        """(running, queued) requests."""
        ...

    async def generate(self, request: GenerateRequest) -> list[SampleResult]: ...
    def stream(self, request: GenerateRequest) -> AsyncIterator[SampleDelta]: ...
    async def abort(self, request_id: str | None = None) -> int:
        """Abort one request (None: all); the number aborted. They return partial output."""
        ...

    def tokenize(self, text: str) -> list[int]: ...
    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    async def pause(self) -> None:
        """Hold running requests between steps and queue new ones until resume()."""
        ...

    async def resume(self) -> None: ...
    async def update_weights(self, path: str) -> int:
        """Load new weights and bump the policy version; the new version."""
        ...

    async def flush_cache(self) -> None:
        """Drop KV caches; the rollout history is kept."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def health(self) -> dict[str, Any]: ...
    def server_info(self) -> dict[str, Any]: ...


@runtime_checkable
class SetsWeightVersion(Protocol):
    """A worker whose weight update can set the policy version instead of bumping it (the
    FakeWorker and the engine's): what lets a worker that missed updates, or restarted at its
    start-up version, be brought to the version the rest of the deployment serves."""

    async def update_weights_to(self, path: str, version: int) -> int:
        """Load new weights as policy `version` (not below the current one); the version."""
        ...


def weights_refused(path: str, error: BaseException) -> InvalidRequest:
    """The one answer to a weight update that cannot load, whatever the cause (missing, not a
    checkpoint, another model's shapes): the caller learns nothing of the worker's
    filesystem; the log gets the cause."""
    logging.getLogger("service.worker").warning("cannot load weights from %r", path, exc_info=error)
    return InvalidRequest(
        "cannot load weights from model_path: not a checkpoint of this model", "model_path"
    )


def check_version_forward(version: int, current: int) -> None:
    """A policy version never goes back: the rollout history is windowed by version."""
    if version < current:
        raise InvalidRequest(
            f"weight_version {version} is behind this worker's {current}: a policy version "
            "never goes back",
            "weight_version",
        )
