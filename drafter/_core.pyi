# Types of the native module built from drafter/_native (see SuffixTree for the semantics).
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from drafter.draft import Draft

class SuffixTreeCore:
    def __init__(self, max_depth: int) -> None: ...
    def extend(self, seq_id: int, tokens: npt.NDArray[np.int32]) -> None: ...
    def remove(self, seq_id: int) -> None: ...
    def contains(self, seq_id: int) -> bool: ...
    def count(self, tokens: npt.NDArray[np.int32]) -> int: ...
    def speculate(
        self, context: npt.NDArray[np.int32], max_tokens: int, min_prob: float, tree: bool
    ) -> tuple[list[int], list[int], list[float], float, int]: ...
    def speculate_capped(
        self,
        context: npt.NDArray[np.int32],
        max_tokens: int,
        min_prob: float,
        tree: bool,
        spec_factor: float,
        spec_offset: float,
    ) -> tuple[list[int], list[int], list[float], float, int]: ...
    def num_sequences(self) -> int: ...
    def num_tokens(self) -> int: ...
    def num_nodes(self) -> int: ...
    def memory_bytes(self) -> int: ...
    def check_integrity(self) -> str: ...

def speculate_batch(
    rows: Sequence[
        tuple[
            SuffixTreeCore, SuffixTreeCore | None, SuffixTreeCore | None, int, SuffixTreeCore | None
        ]
    ],
    max_tokens: Sequence[int],
    context_len: int,
    min_prob: float,
    tree: bool,
    spec_factor: float,
    spec_offset: float,
    own_wins_ties: bool,
    draft_type: type[Draft],
    source_names: tuple[str, str, str, str, str],
) -> list[Draft]: ...
def extend_batch(
    rows: Sequence[tuple[SuffixTreeCore | int, ...]],
    tokens: Sequence[Sequence[int]],
    threads: int = 1,
) -> None: ...
def cut_drafts(
    sizes: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.float64],
    match_lens: npt.NDArray[np.int64],
    source_bins: npt.NDArray[np.int64],
    parents: npt.NDArray[np.int64],
    probs: npt.NDArray[np.float64],
    binning: tuple[npt.NDArray[np.float64], int, int, int],
    table: npt.NDArray[np.float64],
    accepted: npt.NDArray[np.float64],
    tried: npt.NDArray[np.float64],
    total_remaining: float,
    step_time: float,
    c_tok: float,
    refund_chance: float,
    probe_chance: float,
    draft_costs: npt.NDArray[np.float64],
    past_steps: int,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.uint8]
]: ...
def paying_count(
    values: npt.NDArray[np.float64],
    draft_costs: npt.NDArray[np.float64],
    past_steps: int,
    c_tok: float,
) -> int: ...
def calibration_table(
    accepted: npt.NDArray[np.float64],
    tried: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    priors: npt.NDArray[np.float64],
    coarse_weight: float,
    fine_weight: float,
    position_discount: float,
    floor: float,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
