"""Speculation policies: how many draft tokens each live request gets at a verify step.

A policy is one object per engine (or simulation) behind the Policy protocol below. The rules:
- "none" and "fixed:K" (FixedPolicy): the same budget for every request at every step;
- "das", "das-rate" and "das-eq7" (drafter/das.py): DAS's length-aware budgets (Shao et al.,
  "Beat the long tail", arXiv 2511.13841), from per-group length predictions
  (drafter/lengths.py), online acceptance estimates (drafter/acceptance.py), the worker's cost
  model (drafter/cost.py) and the live batch; the budget functions themselves are in
  drafter/budgets.py.
drafter/policy_spec.py turns a name into a fresh policy object. A policy may also cut the
drafts it sized once they are drafted (the Trimming protocol, das).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from drafter.acceptance import check_step
from drafter.cost import CostModel
from drafter.draft import Draft
from drafter.lengths import LengthClass, check_length


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy sees of a live request: its prompt group, the tokens it has generated so
    far, and the length class it started in (from policy.request)."""

    group: str
    generated: int = 0
    initial_class: LengthClass = LengthClass.MEDIUM

    def __post_init__(self) -> None:
        if self.generated < 0:
            raise ValueError(f"generated must be >= 0, got {self.generated}")

    def advanced(self, tokens: int) -> RequestView:
        return RequestView(self.group, self.generated + tokens, self.initial_class)


class Policy(Protocol):
    """A speculation policy. It holds its per-group estimates; its caller (the speculation
    core, drafter/speculator.py, or the simulator) calls request() when a request starts,
    budgets() once per verify step with every live request, observe_step() per request per
    step and observe_finished() when a rollout ends by itself."""

    @property
    def name(self) -> str: ...
    @property
    def drafts(self) -> bool:
        """False if this policy never drafts (its caller need not build any suffix tree)."""
        ...

    @property
    def cost(self) -> CostModel | None:
        """The cost model it prices draft tokens with (None: it prices none)."""
        ...

    @property
    def predicts_lengths(self) -> bool:
        """True if request() predicts the request's length class from its group's history."""
        ...

    def reprice(self, cost: CostModel) -> None:
        """The worker measured its cost model again: price draft tokens with this one from
        now on, keeping every estimate learned so far (a policy that prices none ignores it)."""
        ...

    def request(self, group: str) -> RequestView: ...
    def budgets(self, requests: Sequence[RequestView]) -> list[int]: ...
    def observe_step(self, group: str, drafted: int, accepted: int) -> None: ...
    def observe_finished(self, group: str, length: int) -> None: ...


@runtime_checkable
class Trimming(Protocol):
    """A policy that looks at each draft before it is verified. Its caller calls trim() once
    per verify step right after drafting, with the list it passed to budgets() and the
    drafts, and verifies what it returns; then observe_drafts() once with those views (the
    same objects), how many tokens of each trimmed draft were verified, how many of those the
    target accepted and the tokens each request appended (the accepted ones first: which
    branch of a tree draft was taken), before the views advance."""

    @property
    def trims(self) -> bool:
        """False if trim() returns every draft unchanged (the caller may skip both calls)."""
        ...

    def trim(self, requests: Sequence[RequestView], drafts: Sequence[Draft]) -> list[Draft]: ...
    def observe_drafts(
        self,
        requests: Sequence[RequestView],
        drafted: Sequence[int],
        accepted: Sequence[int],
        tokens: Sequence[Sequence[int]] | None = None,
    ) -> None: ...


def trimmer(policy: Policy) -> Trimming | None:
    """The policy as a Trimming one if it trims drafts, else None."""
    return policy if isinstance(policy, Trimming) and policy.trims else None


class FixedPolicy:
    """The same draft budget for every request at every step (0: no speculation)."""

    predicts_lengths = False
    cost = None

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.budget = budget

    @property
    def name(self) -> str:
        return "none" if self.budget == 0 else f"fixed:{self.budget}"

    @property
    def drafts(self) -> bool:
        return self.budget > 0

    def reprice(self, cost: CostModel) -> None:
        pass  # it prices nothing

    def request(self, group: str) -> RequestView:
        return RequestView(group)

    def budgets(self, requests: Sequence[RequestView]) -> list[int]:
        return [self.budget] * len(requests)

    def observe_step(self, group: str, drafted: int, accepted: int) -> None:
        check_step(drafted, accepted)

    def observe_finished(self, group: str, length: int) -> None:
        check_length(length)
