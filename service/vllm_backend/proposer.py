"""DasProposer: vLLM's speculative method "suffix", drafting through our speculation core.

vLLM's model runner builds `SuffixDecodingProposer(vllm_config)` by the name it imported
(vllm/v1/worker/gpu_model_runner.py) and checks the drafter with isinstance; the plugin binds
this subclass to that name, so vLLM's whole suffix path (config checks, scheduling of a
different draft length per request, verification) runs unchanged and only the drafts are
ours. The runner methods wrapped in patch_runner give the proposer what propose() does not
pass: the runner's request states (group and sample index from sampling_params.extra_args,
max_tokens), the removal of a request, and the time of each step (for calibration).

Pinned to vLLM 0.32.0's interfaces; tests/vllm/test_contract.py fails when they move.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from service.vllm_backend.config import CONFIG_KEY, DasVllmOptions
from service.vllm_backend.drafting import EngineDrafter, Row


@functools.cache
def proposer_class() -> type[Any]:
    """DasProposer, built on first use: vLLM is imported only inside its processes."""
    from vllm.v1.spec_decode.suffix_decoding import SuffixDecodingProposer

    class DasProposer(SuffixDecodingProposer):  # type: ignore[misc]  # vLLM is untyped here
        """Ours where vLLM's additional_config has a "das" entry; otherwise vLLM's own suffix
        decoding (Arctic's cache), unchanged, so one process can serve either."""

        def __init__(self, vllm_config: Any) -> None:
            extra = vllm_config.additional_config
            data = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
            self.engine_drafter: EngineDrafter | None = None
            self.requests: dict[str, Any] = {}  # the runner's CachedRequestState by id
            if data is None:
                super().__init__(vllm_config)
                return
            # Not SuffixDecodingProposer.__init__: it builds Arctic's cache, unused here.
            config = vllm_config.speculative_config
            if config is None:
                raise ValueError("DasProposer needs a speculative config")
            self.num_speculative_tokens = config.num_speculative_tokens
            self.max_model_len = vllm_config.model_config.max_model_len
            self.engine_drafter = EngineDrafter(DasVllmOptions.from_dict(data))

        def propose(
            self,
            num_speculative_tokens: int,
            input_batch: Any,
            sampled_token_ids: list[list[int]],
            slot_mappings: Any = None,
        ) -> list[list[int]]:
            if self.engine_drafter is None:
                drafts: list[list[int]] = super().propose(
                    num_speculative_tokens, input_batch, sampled_token_ids, slot_mappings
                )
                return drafts
            limit = min(num_speculative_tokens, self.num_speculative_tokens)
            rows = batch_rows(
                input_batch, sampled_token_ids, self.requests, limit, self.max_model_len
            )
            return self.engine_drafter.propose(rows)

        def load_model(self, *args: Any, **kwargs: Any) -> None:
            pass  # no draft model

    return DasProposer


def batch_rows(
    input_batch: Any,
    sampled_token_ids: list[list[int]],
    requests: dict[str, Any],
    limit: int,
    max_model_len: int,
) -> list[Row]:
    """The rows of vLLM's InputBatch as EngineDrafter reads them."""
    rows = []
    token_ids = input_batch.token_ids_cpu
    for i, sampled in enumerate(sampled_token_ids):
        req_id = input_batch.req_ids[i]
        index = input_batch.req_id_to_index[req_id]
        num_tokens = int(input_batch.num_tokens_no_spec[index])
        num_prompt = int(input_batch.num_prompt_tokens[index])
        state = requests.get(req_id)
        params = None if state is None else state.sampling_params
        cap = min(limit, max_model_len - num_tokens - 1)
        if params is not None and params.max_tokens is not None:
            # The next step's own token is free: a draft longer than what is left minus one
            # would only be cut.
            cap = min(cap, params.max_tokens - (num_tokens - num_prompt) - 1)
        rows.append(
            Row(
                req_id=req_id,
                sampled=list(sampled),
                prompt=functools.partial(_prompt, token_ids, index, num_prompt),
                extra_args=None if params is None else params.extra_args,
                cap=max(cap, 0),
            )
        )
    return rows


def _prompt(token_ids: Any, index: int, num_prompt: int) -> list[int]:
    return [int(t) for t in token_ids[index, :num_prompt]]


def _drafter(runner: Any) -> EngineDrafter | None:
    """The runner's EngineDrafter; None for any other drafter (vLLM's suffix included)."""
    drafter: EngineDrafter | None = getattr(
        getattr(runner, "drafter", None), "engine_drafter", None
    )
    return drafter


def patch_runner(runner_class: Any) -> None:
    """Wrap three GPUModelRunner methods (CPUModelRunner inherits them); idempotent."""
    if getattr(runner_class, "_das_patched", False):
        return
    runner_class._das_patched = True
    execute_model: Callable[..., Any] = runner_class.execute_model
    propose: Callable[..., Any] = runner_class.propose_draft_token_ids
    removed: Callable[..., Any] = runner_class._on_request_state_removed

    @functools.wraps(execute_model)
    def execute_model_timed(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        drafter = _drafter(self)
        if drafter is not None:
            drafter.step_started()
        return execute_model(self, scheduler_output, *args, **kwargs)

    @functools.wraps(propose)
    def propose_with_states(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        drafter = _drafter(self)
        if drafter is not None:
            self.drafter.requests = self.requests  # the proposer reads sampling params there
            drafter.step_timed(
                int(scheduler_output.total_num_scheduled_tokens),
                prefill=bool(scheduler_output.scheduled_new_reqs),
            )
        tally: SpecTally | None = getattr(self, "_das_tally", None)
        if tally is None:
            tally = self._das_tally = SpecTally()
        sampled = args[0] if args else kwargs.get("sampled_token_ids")
        if isinstance(sampled, list):
            tally.verified(self.input_batch.req_ids, sampled)
        began = time.perf_counter()
        drafts = propose(self, scheduler_output, *args, **kwargs)
        tally.seconds += time.perf_counter() - began
        if isinstance(drafts, list):
            tally.proposed(self.input_batch.req_ids, drafts)
        return drafts

    @functools.wraps(removed)
    def removed_hook(self: Any, req_id: str, req_state: Any) -> None:
        removed(self, req_id, req_state)
        drafter = _drafter(self)
        if drafter is not None:
            drafter.removed(req_id)

    runner_class.execute_model = execute_model_timed
    runner_class.propose_draft_token_ids = propose_with_states
    runner_class._on_request_state_removed = removed_hook


class SpecTally:
    """Drafted and accepted tokens of whatever drafter vLLM runs (ours, its ngram or its
    suffix decoding), counted the same way: a request's draft of k tokens, then the tokens it
    gained in the next step (accepted = gained - 1). The benchmark compares the methods by
    it; the proposer's own time per step is here too."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.drafted = 0
        self.accepted = 0
        self.steps = 0
        self.seconds = 0.0

    def verified(self, req_ids: list[str], sampled: list[list[int]]) -> None:
        self.steps += 1
        for req_id, tokens in zip(req_ids, sampled, strict=False):
            drafted = self.pending.pop(req_id, 0)
            if drafted and tokens:
                self.drafted += drafted
                self.accepted += min(len(tokens) - 1, drafted)

    def proposed(self, req_ids: list[str], drafts: list[Any]) -> None:
        self.pending = {r: len(d) for r, d in zip(req_ids, drafts, strict=False) if len(d)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "steps": self.steps,
            "propose_seconds": self.seconds,
        }


def das_rpc(worker: Any, name: str, *args: Any) -> Any:
    """The worker's calls into the engine core's drafter (bound as vLLM's Worker.das_rpc and
    reached through collective_rpc("das_rpc", ...)): EngineDrafter's settle, add_rollouts,
    set_version, stats or group_lengths (None without a DasProposer), and "tally" (any
    drafter: SpecTally's counts)."""
    if name == "tally":
        tally: SpecTally | None = getattr(worker.model_runner, "_das_tally", None)
        return (tally or SpecTally()).to_dict()
    if name not in _RPCS:
        raise ValueError(f"unknown das_rpc {name!r}")
    drafter = _drafter(worker.model_runner)
    if drafter is None:
        return None
    return getattr(drafter, name)(*args)


_RPCS = frozenset({"settle", "add_rollouts", "set_version", "stats", "group_lengths"})
