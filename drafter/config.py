"""Knobs of the drafter: one frozen dataclass that checks itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DrafterConfig:
    max_depth: int = 64  # suffix tree depth: longest stored substring (match + draft)
    # Policy versions of rollouts kept per group (current one included). 8: on a 12-epoch
    # SmolLM2 trace 8 beat 4 and 12 added nothing (README, Measured).
    window: int = 8
    max_rollouts_per_group: int = 64  # newest rollouts kept per group, whatever their version
    # Prompt groups kept: beyond it the least recently used one without a running request is
    # dropped (the window alone bounds nothing while no weight update comes and new prompts do).
    max_groups: int = 8192
    min_prob: float = 0.1  # a draft path stops once its estimated probability falls below
    tree_drafts: bool = False  # best-first tree drafts instead of chains
    # The group's tree also holds its running requests' outputs so far (their siblings').
    live_siblings: bool = True
    # Where neither the group's trees nor the request's own context match, draft from the
    # stored rollouts of every group (one more tree holding each rollout once more). Off: it
    # doubles the stored rollouts' memory for at most 0.8% in the replays (README, Measured).
    other_groups: bool = False
    # Threads that grow a verify step's trees (suffix_tree.extend_batch): 1, the caller's; 0,
    # one per CPU (at most 8) once a step appends 256 tree tokens or more. 1 by default: right
    # after torch's CPU ops, as a CPU engine records a step, helper threads made the growth
    # no faster or slower (README, "Trees grown on threads").
    extend_threads: int = 1

    def __post_init__(self) -> None:
        if self.max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {self.max_depth}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.max_rollouts_per_group < 1:
            raise ValueError(
                f"max_rollouts_per_group must be >= 1, got {self.max_rollouts_per_group}"
            )
        if self.max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {self.max_groups}")
        if self.extend_threads < 0:
            raise ValueError(f"extend_threads must be >= 0, got {self.extend_threads}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob}")
