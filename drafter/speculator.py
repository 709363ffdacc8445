"""The speculation core: the one interface through which every engine drafts.

The embedded engine, a vLLM proposer and an SGLang worker all drive it the same way, from the
thread that owns the engine (it is not thread-safe):
- start(request_id, group, prompt, sample_index) when a sample joins the batch;
- drafts(requests, max_draft) once per verify step with every live sample: budgets from the
  policy for the live batch (its size, the cost model, each request's predicted length), then
  every request's draft from its group's windowed history and its own context, in one native
  call for the whole step (suffix decoding, the "suffix" policy, drafts from its own global
  cache instead: draft_source);
- extend(request, tokens, drafted, accepted) after verification with the tokens it appended
  (drafted and accepted are also counted under the source of the request's last draft);
- finish(request, natural) when it ends: a rollout that ended by itself (stop or length) joins
  the local history at once and is handed to the publisher (e.g. Redis, to the other workers);
  an aborted one does neither.
Per request it counts forward passes, drafted and accepted tokens; no torch, no HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Protocol

from drafter.cost import CostCurve, LiveStepCost
from drafter.draft import NO_DRAFT, Draft, Tokens, as_token_array
from drafter.history import RolloutHistory
from drafter.policy import Policy, RequestView, trimmer
from drafter.suffix_decoding import SuffixPolicy


@dataclass(slots=True)
class RequestCounters:
    forward_passes: int = 0  # verify steps that produced tokens for the request
    drafted: int = 0  # draft tokens proposed to the target
    accepted: int = 0  # draft tokens the target accepted and the request kept
    # The same two by the tree each draft came from (Draft.source: drafter.draft.DRAFT_SOURCES).
    drafted_by_source: dict[str, int] = field(default_factory=dict)
    accepted_by_source: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rollout:
    """A rollout that ended by itself, as it enters the history."""

    group: str
    prompt: list[int]
    output: list[int]
    version: int  # the policy version that produced it


Publisher = Callable[[Rollout], None]


class DraftSource(Protocol):
    """Where live requests' drafts come from: the rollout history (RolloutHistory), or
    suffix decoding's own cache (SuffixDecodingCache) under the suffix policy."""

    def start_request(self, request_id: Hashable, group: str, prompt: Tokens) -> None: ...
    def extend_request(self, request_id: Hashable, tokens: Tokens) -> None: ...
    def extend_batch(
        self, request_ids: Sequence[Hashable], tokens: Sequence[list[int]]
    ) -> None: ...
    def stop_request(self, request_id: Hashable) -> None: ...
    def speculate(self, request_id: Hashable, max_tokens: int) -> Draft: ...
    def speculate_batch(
        self, request_ids: Sequence[Hashable], max_tokens: Sequence[int]
    ) -> list[Draft]: ...


def draft_source(policy: Policy, history: RolloutHistory) -> DraftSource:
    """The suffix policy drafts from its own global cache, as suffix decoding does; every
    other policy from the rollout history."""
    return policy.cache if isinstance(policy, SuffixPolicy) else history


@dataclass(slots=True, eq=False)
class SpecRequest:
    """One live sample, as the speculation core tracks it (its handle for every call)."""

    request_id: str
    sample_index: int
    group: str
    prompt: list[int]
    view: RequestView  # what the policy sees of it; view.initial_class was predicted at start
    output: list[int] = field(default_factory=list)
    counters: RequestCounters = field(default_factory=RequestCounters)
    finished: bool = False
    draft_source: str = ""  # where its draft for the coming verify step came from
    key: tuple[str, int] = field(init=False)  # its id in the rollout history

    def __post_init__(self) -> None:
        # Made once, not per step: a property's new tuple per row shows at hundreds of rows.
        self.key = (self.request_id, self.sample_index)


_KEY = attrgetter("key")


class Speculator:
    def __init__(
        self,
        history: RolloutHistory,
        policy: Policy,
        *,
        max_draft: int = 16,
        publish: Publisher | None = None,
        cost_curve: CostCurve | LiveStepCost | None = None,
    ) -> None:
        """`max_draft` caps every draft whatever the policy says; `publish` receives each
        rollout that ended by itself, after it joined `history`; with `cost_curve`, a policy
        that prices drafts is repriced at every step with the curve's cost model for the live
        batch's size (a LiveStepCost's as it learned it from the steps timed: time_step)."""
        if max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {max_draft}")
        self.history = history
        self.policy = policy
        self.source = draft_source(policy, history)
        self.max_draft = max_draft
        self._publish = publish
        # Without drafting the per-request suffix trees are not worth maintaining.
        self.drafting = max_draft > 0 and policy.drafts
        self.cost_curve = cost_curve if policy.cost is not None else None

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """A new policy object of the same kind (e.g. one priced by a newly fitted cost model):
        it sizes, and if it trims cuts, every draft from the next step on."""
        self._policy = policy
        self._trimmer = trimmer(policy)  # das cuts each drafted step (policy.Trimming)
        self._priced_rows = 0  # the batch size the policy was last repriced for

    def time_step(self, rows: int, tokens: int, seconds: float) -> None:
        """A verify step of `rows` requests and `tokens` tokens in all took `seconds` (its
        forward and sampling): a live cost (LiveStepCost) learns it, and the policy is repriced
        with what it learned from the next step on; otherwise nothing."""
        if isinstance(self.cost_curve, LiveStepCost):
            self.cost_curve.observe(rows, tokens, seconds)
            self._priced_rows = 0

    def start(
        self, request_id: str, group: str, prompt: Tokens, sample_index: int = 0
    ) -> SpecRequest:
        tokens = as_token_array(prompt)
        if tokens.size == 0:
            raise ValueError("the prompt must not be empty")
        request = SpecRequest(
            request_id, sample_index, group, tokens.tolist(), self.policy.request(group)
        )
        if self.drafting:
            self.source.start_request(request.key, group, tokens)
        return request

    def drafts(self, requests: Sequence[SpecRequest], max_draft: Sequence[int]) -> list[Draft]:
        """One draft per live request for the next verify step, at most max_draft[i] tokens
        (e.g. the tokens it may still generate) and this core's max_draft."""
        if len(max_draft) != len(requests):
            raise ValueError("need one max_draft per request")
        if not self.drafting or not requests:
            return [NO_DRAFT] * len(requests)
        views = [request.view for request in requests]
        if self.cost_curve is not None and len(requests) != self._priced_rows:
            self.policy.reprice(self.cost_curve.at(len(requests)))
            self._priced_rows = len(requests)
        budgets = self.policy.budgets(views)
        cap = self.max_draft
        # min(budget, max_draft, cap) by comparisons: calling min() per row costs 4x as much,
        # which shows at hundreds of rows per step.
        sizes = [
            (b if b < cap else cap) if b < m else (m if m < cap else cap)
            for b, m in zip(budgets, max_draft, strict=True)
        ]
        if min(sizes) < 0:  # a cap below 0 (nothing left to generate): no draft
            sizes = [max(0, size) for size in sizes]
        # One native call for the whole step, over the rows that draft (a step where das's
        # budgets give most rows nothing, a CPU's at T = 1.0, skips building their empty drafts).
        drafting = [row for row, size in enumerate(sizes) if size]
        if len(drafting) == len(sizes):
            drafts = self.source.speculate_batch(list(map(_KEY, requests)), sizes)
        else:
            drafts = [NO_DRAFT] * len(sizes)
            if drafting:
                keys = [requests[row].key for row in drafting]
                some = self.source.speculate_batch(keys, [sizes[row] for row in drafting])
                for row, draft in zip(drafting, some, strict=True):
                    drafts[row] = draft
        if self._trimmer is not None:
            drafts = self._trimmer.trim(views, drafts)
        for request, draft in zip(requests, drafts, strict=True):
            request.draft_source = draft.source
        return drafts

    def extend(
        self, request: SpecRequest, tokens: Sequence[int], drafted: int, accepted: int
    ) -> None:
        """A verify step's outcome: it drafted `drafted` tokens, the target accepted the first
        `accepted`, and the request appended `tokens` (the accepted ones and the target's next
        token, cut where the request stopped)."""
        self.extend_batch([request], [tokens], [drafted], [accepted])

    def extend_batch(
        self,
        requests: Sequence[SpecRequest],
        tokens: Sequence[Sequence[int]],
        drafted: Sequence[int],
        accepted: Sequence[int],
    ) -> None:
        """extend() for every row of a verify step, the draft source's trees grown in one
        call (the step's rows each once). Every row is checked before any changes."""
        if not len(requests) == len(tokens) == len(drafted) == len(accepted):
            raise ValueError("need tokens, drafted and accepted per request")
        for request, n_drafted, n_accepted in zip(requests, drafted, accepted, strict=True):
            if request.finished:
                raise ValueError(f"request {request.key!r} has finished")
            if not 0 <= n_accepted <= n_drafted:
                raise ValueError(f"need 0 <= accepted <= drafted, got {n_accepted}, {n_drafted}")
        policy = self.policy
        if self._trimmer is not None:  # what its drafts taught, before the views advance
            self._trimmer.observe_drafts(
                [request.view for request in requests], drafted, accepted, tokens
            )
        appended_rows = []
        for request, row, n_drafted, n_accepted in zip(
            requests, tokens, drafted, accepted, strict=True
        ):
            # The policy learns what verification accepted; the counters count what was kept.
            policy.observe_step(request.group, n_drafted, n_accepted)
            appended = list(row)
            appended_rows.append(appended)
            request.output += appended
            request.view = request.view.advanced(len(appended))
            counters = request.counters
            counters.forward_passes += 1
            counters.drafted += n_drafted
            kept = min(n_accepted, len(appended))
            counters.accepted += kept
            source, request.draft_source = request.draft_source, ""
            if n_drafted and source:
                by_source = counters.drafted_by_source
                by_source[source] = by_source.get(source, 0) + n_drafted
                by_source = counters.accepted_by_source
                by_source[source] = by_source.get(source, 0) + kept
        if self.drafting:
            self.source.extend_batch(list(map(_KEY, requests)), appended_rows)

    def finish(self, request: SpecRequest, natural: bool) -> Rollout | None:
        """The request ended: by itself (natural: a stop or its length limit), or aborted.
        A natural end enters the history and the publisher; the rollout, None if aborted."""
        if request.finished:
            raise ValueError(f"request {request.key!r} has finished")
        request.finished = True
        if self.drafting:
            self.source.stop_request(request.key)
        if not natural:
            return None
        rollout = Rollout(request.group, request.prompt, request.output, self.history.version)
        self.history.add_rollout(rollout.group, rollout.output, rollout.version, rollout.prompt)
        self.policy.observe_finished(request.group, len(request.output))
        if self._publish is not None:
            self._publish(rollout)
        return rollout

    def length_class(self, request: SpecRequest) -> str:
        """The length class predicted for the request when it started ("unknown" if the
        policy predicts none): the label its finished length is reported under."""
        if not self.policy.predicts_lengths:
            return "unknown"
        return request.view.initial_class.name.lower()
