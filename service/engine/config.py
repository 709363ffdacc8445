"""Knobs of the embedded engine: one frozen dataclass that checks itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from drafter.config import DrafterConfig
from drafter.cost import parse_cost_model
from drafter.policy_spec import parse_policy_spec
from service.engine.models import DEFAULT_MODEL
from service.engine.sampling import LogprobsMode

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # a name load_model knows, a model directory or a .gguf file
    device: str = "cpu"
    dtype: str = "float32"  # float32, bfloat16 or float16
    max_batch: int = 16  # sequences decoding at once (KV cache slots)
    max_model_len: int = 1024  # prompt + output tokens of one sequence (KV positions per slot)
    max_prefill_tokens: int = 2048  # prompt tokens admitted per step (one prompt always fits)
    speculation: str = "none"  # budget policy: none, fixed:K, das, das-rate, das-eq7 or suffix
    # What das prices draft tokens with: calibrate (time this engine's verify step when it
    # starts), a preset (smollm2-cpu, h100-7b) or "C_BASE,C_TOK" seconds (drafter/cost.py).
    cost_model: str = "calibrate"
    max_draft: int = 16  # cap on draft tokens per sequence per step, whatever the policy says
    # Batch-invariant numerics: a token's logits are bitwise the same whatever its batch
    # companions or draft length, so speculation is bitwise lossless (see runner.py); slower.
    deterministic: bool = False
    logprobs_mode: LogprobsMode = "raw"  # raw: the model's log_softmax; processed: sampled from
    # drafter.tree_drafts: best-first tree drafts, verified under a tree mask (chains in
    # deterministic mode: a tree is cut to its most probable path there).
    drafter: DrafterConfig = field(default_factory=DrafterConfig)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {self.max_draft}")
        if self.logprobs_mode not in ("raw", "processed"):
            raise ValueError(f"logprobs_mode must be raw or processed, got {self.logprobs_mode!r}")
        parse_policy_spec(self.speculation)  # raises ValueError for an unknown policy
        parse_cost_model(self.cost_model)  # likewise for an unknown cost model

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
