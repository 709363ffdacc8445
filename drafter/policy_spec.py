"""Policy names, as flags and settings spell them: none, fixed:K, das, das-rate, das-eq7,
suffix."""

from __future__ import annotations

from dataclasses import dataclass, replace

from drafter.cost import SMOLLM2_CPU, CostModel
from drafter.das import DasConfig, DasPolicy
from drafter.policy import FixedPolicy, Policy
from drafter.suffix_decoding import SuffixPolicy

_MAX_FIXED = 1024
_DAS_NAMES = {"das": "match", "das-rate": "rate", "das-eq7": "eq7"}  # name: DasConfig.rule


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """A parsed policy name: "none", "fixed:K" (1 <= K <= 1024), "das", "das-rate",
    "das-eq7" or "suffix" (suffix decoding as vLLM configures it,
    drafter/suffix_decoding.py)."""

    kind: str  # "none", "fixed", "das", "das-rate", "das-eq7" or "suffix"
    budget: int = 0  # K of fixed:K

    def __str__(self) -> str:
        return f"fixed:{self.budget}" if self.kind == "fixed" else self.kind


def parse_policy_spec(spec: str) -> PolicySpec:
    text = spec.strip()
    if text in ("none", *_DAS_NAMES, "suffix"):
        return PolicySpec(text)
    name, sep, arg = text.partition(":")
    if name == "fixed" and sep:
        if not arg.isdecimal():
            raise ValueError(f"fixed:K needs a whole number K, got {spec!r}")
        budget = int(arg)
        if not 1 <= budget <= _MAX_FIXED:
            raise ValueError(f"fixed:K needs 1 <= K <= {_MAX_FIXED} (none for 0), got {spec!r}")
        return PolicySpec("fixed", budget)
    raise ValueError(
        f"unknown policy {spec!r}: expected none, fixed:K, das, das-rate, das-eq7 or suffix"
    )


def parse_policy(
    spec: str, cost: CostModel = SMOLLM2_CPU, config: DasConfig | None = None
) -> Policy:
    """A fresh policy object from its name: "none", "fixed:K", "das" (each draft token priced
    by its calibrated acceptance), "das-rate" (one acceptance rate per group), "das-eq7" (the
    closed-form rule; for the three, `config`'s rule is overridden by the name) or "suffix"
    (with its own fresh response cache; it prices nothing, so `cost` is unused)."""
    parsed = parse_policy_spec(spec)
    if parsed.kind == "suffix":
        return SuffixPolicy()
    if parsed.kind in _DAS_NAMES:
        return DasPolicy(cost, replace(config or DasConfig(), rule=_DAS_NAMES[parsed.kind]))
    return FixedPolicy(parsed.budget)


# A das policy spelled with a suffix plans otherwise than by default, so that the two can be
# compared in one run. By default an engine prices each step by its calibration's cost curve
# as corrected by the steps it has timed since (drafter.cost.LiveStepCost); das/startup (in a
# benchmark) by the curve as calibrated at start-up; das/line (in a benchmark or a replay) by
# the one line fitted over all batch sizes.
LINE_PRICED = "/line"
STARTUP_PRICED = "/startup"
PRICINGS = {LINE_PRICED: "line", STARTUP_PRICED: "startup"}  # suffix: pricing


def mode_policy(mode: str) -> tuple[str, str]:
    """A mode's canonical policy name, and how a das policy plans where the engine calibrated
    a cost curve: "live" (by default), "startup" or "line"."""
    name = mode.strip()
    suffix = next((suffix for suffix in PRICINGS if name.endswith(suffix)), "")
    spec = parse_policy_spec(name.removesuffix(suffix) if suffix else name)
    if suffix and not spec.kind.startswith("das"):
        raise ValueError(f"{suffix} applies to das policies only, got {mode!r}")
    return str(spec), PRICINGS.get(suffix, "live")


def canonical_mode(mode: str) -> str:
    name, pricing = mode_policy(mode)
    return name + next((suffix for suffix, p in PRICINGS.items() if p == pricing), "")
