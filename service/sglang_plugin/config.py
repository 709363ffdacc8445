"""What an SGLang worker drafts with: its Speculator, from the DAS_* settings.

The launcher (launch.py) runs SGLang with the worker's settings in the environment, and every
SGLang scheduler process builds its speculator from them (Settings reads DAS_*). Two rules
differ from the embedded engine:
- no calibration: nothing can time SGLang's verify step from inside our draft hook, so the
  cost model must be explicit (a GPU preset or C_BASE,C_TOK), and the CPU preset is refused:
  a GPU worker must never plan with this CPU's constants;
- tree drafts: NGRAM verifies a tree anyway, so the history drafts best-first trees.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from drafter.config import DrafterConfig
from drafter.cost import SMOLLM2_CPU, CostModel, parse_cost_model
from drafter.history import RolloutHistory
from drafter.policy_spec import parse_policy
from drafter.speculator import Publisher, Speculator
from service.settings import Settings

# SGLang's --speculative-num-draft-tokens D: the root and up to D - 1 draft tokens per request
# per step. Every request verifies D tokens at every step whatever its budget (padding), so D
# should be the budget the policy gives where a rollout spends its steps, not its largest one.
# DAS's makespan pricing on the h100-7b cost model keeps 1 (batch 128) to 8 (batch 1) tokens
# of a chain whose n-th token is accepted with chance 0.5 ** n, 3 to 15 at 0.7 ** n (6 at
# batch 32): D = 8 (7 draft tokens) leaves every batch of 4 or more (0.5), of 32 or more (0.7),
# uncapped and caps the drained tail. (das-rate budgets exactly that with a rate of 0.5 or 0.7;
# das cuts its drafts by the same test with each token's calibrated chance.)
# tests/sglang/test_launch.py recomputes this; the README's SGLang section has the table.
DEFAULT_DRAFT_WIDTH = 8


class SGLangConfigError(ValueError):
    """Settings an SGLang worker cannot run with."""


def sglang_cost_model(spec: str) -> CostModel:
    """The cost model of an SGLang worker: an explicit GPU one."""
    cost = parse_cost_model(spec)
    if cost is None:
        raise SGLangConfigError(
            "--cost-model calibrate needs the embedded engine; an SGLang worker needs an "
            "explicit one: h100-7b or C_BASE,C_TOK measured on its GPU"
        )
    if cost == SMOLLM2_CPU:
        raise SGLangConfigError(
            "--cost-model smollm2-cpu is this development CPU's; an SGLang worker runs on a "
            "GPU: give h100-7b or C_BASE,C_TOK"
        )
    return cost


def settings_from_env() -> Settings:
    """The worker's settings, as the launcher put them in this process's DAS_* environment."""
    overrides: dict[str, Any] = {}  # none: Settings reads the environment itself
    return Settings(**overrides)


def drafter_config(settings: Settings) -> DrafterConfig:
    """The workers' history knobs, with tree drafts (SGLang verifies trees)."""
    return replace(settings.drafter_config(), tree_drafts=True)


def build_speculator(
    settings: Settings, width: int, publish: Publisher | None = None
) -> Speculator:
    """The speculator of one SGLang scheduler process; drafts of at most width - 1 tokens."""
    if width < 1:
        raise SGLangConfigError(f"the draft width must be >= 1, got {width}")
    policy = parse_policy(settings.speculation_policy, sglang_cost_model(settings.cost_model))
    history = RolloutHistory(drafter_config(settings))
    return Speculator(history, policy, max_draft=width - 1, publish=publish)
