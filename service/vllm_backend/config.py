"""What the worker tells vLLM's engine core about drafting: one frozen dataclass, sent as
vLLM's `additional_config["das"]` (a JSON dict, which reaches every vLLM process)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from drafter.cost import parse_cost_model
from drafter.policy_spec import parse_policy_spec

CONFIG_KEY = "das"  # the key in vLLM's additional_config
# Set in the environment of every process that should run our plugin (vLLM's engine core
# inherits it from the worker); without it the plugin does nothing.
ENABLE_ENV = "DAS_VLLM"


@dataclass(frozen=True, slots=True)
class DasVllmOptions:
    # das, das-rate, das-eq7, fixed:K (none: the worker runs vLLM without drafts)
    policy: str = "das"
    # A preset name or "C_BASE,C_TOK"; "calibrate": fit the cost model to vLLM's own step
    # times, drafting nothing until then (a GPU worker must never plan with CPU constants).
    cost_model: str = "calibrate"
    max_draft: int = 16  # vLLM's num_speculative_tokens: the cap on every draft
    max_depth: int = 64  # suffix tree depth
    window: int = 8  # policy versions kept per group
    max_rollouts_per_group: int = 64
    max_groups: int = 8192
    min_prob: float = 0.1
    live_siblings: bool = True  # draft from the group's running requests' outputs too
    other_groups: bool = False  # where nothing of the group matches, every group's rollouts
    extend_threads: int = 1  # threads growing a step's trees (DrafterConfig.extend_threads)
    calibration_steps: int = 32  # timed steps before the fit

    def __post_init__(self) -> None:
        spec = parse_policy_spec(self.policy)  # ValueError for an unknown policy
        if spec.kind == "none":
            raise ValueError("policy none: run vLLM without a speculative config instead")
        parse_cost_model(self.cost_model)
        if not 1 <= self.max_draft <= 128:
            raise ValueError(f"max_draft must be in [1, 128], got {self.max_draft}")
        if self.calibration_steps < 4:
            raise ValueError(f"calibration_steps must be >= 4, got {self.calibration_steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> DasVllmOptions:
        fields = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in (data or {}).items() if key in fields})
