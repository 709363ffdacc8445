"""Every Prometheus collector of the service, declared once, on a registry made per app.

Nothing here is module-global: each app (worker or gateway) builds its own Metrics, so several
apps live in one process (tests) without clashing. Every collector carries the `worker` label
(for the gateway: the upstream worker, or "gateway" for its own traffic).

Definitions:
- accepted_per_forward: accepted draft tokens per target forward pass, observed once per
  finished sample (that sample's mean), so a sample is one observation whatever its length.
- generation_length: output tokens per finished sample, labelled by the length class the
  worker predicted for it from its group's history before it ran (short / medium / long; a
  group with no history yet is predicted medium; unknown under a policy that predicts no
  lengths: none and fixed:K).
- generated_tokens, forward_passes, drafted_tokens, accepted_tokens: counted when a sample
  finishes, under the same length_class label.
- source_drafted_tokens, source_accepted_tokens: the same draft tokens by the tree each draft
  came from (drafter.draft.DRAFT_SOURCES: "history", the prompt group's stored rollouts, or
  suffix decoding's global cache under the suffix policy; "siblings", the outputs so far of the
  group's running requests, with live_siblings on; "context", the request's own prompt and
  output; "other_groups", every group's stored rollouts where none of those matched, with
  other_groups on), counted when a sample finishes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
_ACCEPT_BUCKETS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
_LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # -- HTTP ---------------------------------------------------------------------------
        self.requests = Counter(
            "das_requests",
            "HTTP requests by endpoint and status",
            ["worker", "endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "das_request_errors",
            "HTTP error responses by endpoint and status",
            ["worker", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "das_request_latency_seconds",
            "HTTP request latency",
            ["worker", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # -- generation ---------------------------------------------------------------------
        self.prompt_tokens = Counter(
            "das_prompt_tokens", "Prompt tokens processed", ["worker"], registry=r
        )
        # Labelled by the sample's predicted length class (as generation_length), so speedup
        # and acceptance read per class: the long class sets each step's makespan.
        per_class = ["worker", "length_class"]
        self.generated_tokens = Counter(
            "das_generated_tokens", "Output tokens generated", per_class, registry=r
        )
        self.forward_passes = Counter(
            "das_forward_passes", "Target forward passes (verify steps)", per_class, registry=r
        )
        self.drafted_tokens = Counter(
            "das_drafted_tokens", "Draft tokens proposed", per_class, registry=r
        )
        self.accepted_tokens = Counter(
            "das_accepted_tokens", "Draft tokens accepted", per_class, registry=r
        )
        per_source = ["worker", "source"]
        self.source_drafted_tokens = Counter(
            "das_source_drafted_tokens",
            "Draft tokens proposed, by the tree the draft came from",
            per_source,
            registry=r,
        )
        self.source_accepted_tokens = Counter(
            "das_source_accepted_tokens",
            "Draft tokens accepted, by the tree the draft came from",
            per_source,
            registry=r,
        )
        self.accepted_per_forward = Histogram(
            "das_accepted_tokens_per_forward",
            "Accepted draft tokens per forward, per sample",
            ["worker"],
            buckets=_ACCEPT_BUCKETS,
            registry=r,
        )
        self.generation_length = Histogram(
            "das_generation_length_tokens",
            "Output tokens per sample, by predicted length class",
            ["worker", "length_class"],
            buckets=_LENGTH_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "das_samples_finished",
            "Finished samples by finish reason",
            ["worker", "reason"],
            registry=r,
        )
        self.running = Gauge("das_running_requests", "Requests generating", ["worker"], registry=r)
        self.queued = Gauge(
            "das_queued_requests", "Requests waiting (paused worker)", ["worker"], registry=r
        )
        self.policy_version = Gauge(
            "das_policy_version", "Policy (weight) version", ["worker"], registry=r
        )
        self.cost_model = Gauge(
            "das_cost_model_seconds",
            "The cost model draft budgets are priced with: one forward pass over n tokens takes "
            "c_base + c_tok * n seconds",
            ["worker", "term"],
            registry=r,
        )
        self.step_cost = Gauge(
            "das_step_cost_seconds",
            "The calibrated cost curve (engine workers): per calibrated batch size (rows), the "
            "line c_base + c_tok * n draft budgets are priced with at that size, as the steps "
            "timed while serving have corrected it",
            ["worker", "rows", "term"],
            registry=r,
        )
        # -- history ------------------------------------------------------------------------
        self.history_tokens = Gauge(
            "das_history_tokens", "Tokens held in the local suffix trees", ["worker"], registry=r
        )
        self.history_groups = Gauge(
            "das_history_groups", "Prompt groups held in the local history", ["worker"], registry=r
        )
        self.redis_errors = Counter(
            "das_redis_errors", "Failed Redis operations", ["worker"], registry=r
        )
        self.buffered_rollouts = Gauge(
            "das_buffered_rollouts", "Rollouts waiting for Redis", ["worker"], registry=r
        )
        self.dropped_rollouts = Counter(
            "das_dropped_rollouts",
            "Buffered rollouts dropped (buffer full)",
            ["worker"],
            registry=r,
        )
        self.synced_rollouts = Counter(
            "das_synced_rollouts", "Rollouts written to Redis", ["worker"], registry=r
        )
        # -- gateway ------------------------------------------------------------------------
        self.upstream_requests = Counter(
            "das_gateway_upstream_requests",
            "Requests forwarded to a worker, by status",
            ["worker", "status"],
            registry=r,
        )
        self.upstream_inflight = Gauge(
            "das_gateway_inflight", "Requests in flight to a worker", ["worker"], registry=r
        )
        self.worker_up = Gauge(
            "das_gateway_worker_up", "1 if the worker passes health checks", ["worker"], registry=r
        )
        self.catch_ups = Counter(
            "das_gateway_catch_ups",
            "Weight updates re-sent to a worker that missed one, by outcome",
            ["worker", "outcome"],
            registry=r,
        )
        # Per API key (by name: key-N, admin, anonymous; never the key itself).
        self.key_samples = Gauge(
            "das_gateway_key_inflight_samples",
            "Samples an API key has running or queued through the gateway",
            ["client"],
            registry=r,
        )
        self.key_rejected = Counter(
            "das_gateway_key_rejected",
            "Requests refused (429) because their API key's budget of samples was full",
            ["client"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def length_class(predicted_length: float | None) -> str:
    """DAS length class of a predicted output length (None: no history yet)."""
    if predicted_length is None:
        return "unknown"
    if predicted_length <= 256:
        return "short"
    if predicted_length <= 2048:
        return "medium"
    return "long"
