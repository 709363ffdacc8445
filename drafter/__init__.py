"""The DAS drafter: suffix trees over rollout history, drafts, and speculation budgets.

No torch and no HTTP here; the engine and the service build on this library.
"""

from drafter.config import DrafterConfig
from drafter.draft import Draft
from drafter.history import GroupStats, RolloutHistory
from drafter.reference import ReferenceSuffixTree
from drafter.suffix_tree import SuffixTree

__all__ = [
    "Draft",
    "DrafterConfig",
    "GroupStats",
    "ReferenceSuffixTree",
    "RolloutHistory",
    "SuffixTree",
]
