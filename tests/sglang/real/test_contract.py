"""The pinned SGLang internals the plugin depends on. A failure here means SGLang moved: read
the new version's ngram_worker.py (and the files named below) before changing the pin."""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points, version

import sglang
from sglang.srt.managers import scheduler
from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req
from sglang.srt.managers.scheduler_components import batch_result_processor
from sglang.srt.plugins import GENERAL_PLUGINS_GROUP
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.ngram_info import NgramVerifyInput
from sglang.srt.speculative.ngram_worker import NGRAMWorker
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

from service.sglang_plugin import CREATE_WORKER

PINNED = "0.5.23"


def params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_the_pinned_version_is_installed_and_our_entry_point_is_in_its_group() -> None:
    assert version("sglang") == sglang.__version__ == PINNED
    assert GENERAL_PLUGINS_GROUP == "sglang.srt.plugins"
    ours = [ep for ep in entry_points(group=GENERAL_PLUGINS_GROUP) if ep.name == "das"]
    assert [ep.value for ep in ours] == ["service.sglang_plugin:register"]


def test_the_hook_we_register() -> None:
    where = f"{SpeculativeAlgorithm.__module__}.SpeculativeAlgorithm.create_worker"
    assert where == CREATE_WORKER
    assert params(SpeculativeAlgorithm.create_worker) == ["self", "server_args"]
    assert params(HookRegistry.register)[:3] == ["target", "hook", "hook_type"]
    assert HookType.AROUND.value == "around"


def test_the_ngram_worker_methods_we_override_or_call() -> None:
    assert params(NGRAMWorker._prepare_draft_tokens) == ["self", "batch"]
    assert params(NGRAMWorker._update_ngram_corpus) == ["self", "batch"]
    assert params(NGRAMWorker.forward_batch_generation) == [
        "self",
        "batch",
        "on_publish",
        "pp_proxy_tensors",
    ]
    assert params(NGRAMWorker.clear_cache_pool) == ["self"]
    finished = inspect.signature(BaseSpecWorker.note_request_finished).parameters
    assert [(n, p.kind) for n, p in finished.items()][1:] == [
        ("rid", inspect.Parameter.KEYWORD_ONLY),
        ("natural_stop", inspect.Parameter.KEYWORD_ONLY),
    ]
    assert issubclass(NGRAMWorker, BaseSpecWorker)


def test_where_sglang_calls_them() -> None:
    prepare = inspect.getsource(NGRAMWorker._prepare_for_speculative_decoding)
    assert "self._prepare_draft_tokens(batch)" in prepare
    assert "torch.from_numpy(mask)" in prepare and "torch.from_numpy(req_drafts)" in prepare
    forward = inspect.getsource(NGRAMWorker.forward_batch_generation)
    assert "self._prepare_for_speculative_decoding(batch)" in forward
    assert "self._update_ngram_corpus(batch)" in forward
    scheduler_source = inspect.getsource(scheduler.Scheduler)
    assert "self.spec_algorithm.create_worker(self.server_args)" in scheduler_source
    assert "self.draft_worker.clear_cache_pool()" in scheduler_source
    assert "load_plugins()" in inspect.getsource(scheduler)  # in the scheduler's process
    # release_memory_occupation (colocated RL) flushes through the scheduler's flush_cache.
    from sglang.srt.managers.scheduler_components.weight_updater import (
        SchedulerWeightUpdaterManager,
    )

    release = inspect.getsource(SchedulerWeightUpdaterManager.release_memory_occupation)
    assert "self.flush_cache()" in release
    assert "flush_cache=self.flush_cache" in scheduler_source
    results = inspect.getsource(batch_result_processor)
    assert "self.draft_worker.note_request_finished(" in results
    # The overlap splice reads these, as NGRAMWorker does.
    source = inspect.getsource(NGRAMWorker._prepare_draft_tokens)
    for name in ("batch.spec_info.accept_tokens", "batch.spec_info.accept_lens"):
        assert name in source
    assert "grammar_needs_sync" in source
    assert {"accept_tokens", "accept_lens"} <= set(params(NgramVerifyInput.__init__))


def test_the_request_fields_we_read() -> None:
    req = Req("r", "", [1, 2], SamplingParams(max_new_tokens=3, custom_params={"a": "b"}))
    for name in ("rid", "origin_input_ids_unpadded", "output_ids", "finished_reason"):
        assert hasattr(req, name)
    assert list(req.output_ids_through_stop) == []
    assert req.sampling_params.custom_params == {"a": "b"}
    assert req.sampling_params.max_new_tokens == 3
    assert not req.finished()
    assert FINISH_ABORT.__name__ == "FINISH_ABORT"  # drafting.py's default abort test


def test_the_launchers_command_line_parses_with_sglangs_own_parser() -> None:
    import argparse

    from sglang.srt.server_args import ServerArgs

    from service.settings import Settings
    from service.sglang_plugin.config import DEFAULT_DRAFT_WIDTH
    from service.sglang_plugin.launch import NGRAM_CAPACITY, sglang_command

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    settings = Settings(
        **{
            "backend": "sglang",
            "model": "/models/m",
            "cost_model": "h100-7b",
            "port": 30000,
            "max_batch": 64,
            "served_model_name": "policy",
            "api_key": "k",
        }
    )
    command = sglang_command(settings, ["--tp-size", "2"])
    assert command[1:3] == ["-m", "sglang.launch_server"]
    args = parser.parse_args(command[3:])
    assert args.model_path == "/models/m"
    assert (args.host, args.port) == ("127.0.0.1", 30000)
    assert args.speculative_algorithm == "NGRAM"
    assert args.speculative_num_draft_tokens == DEFAULT_DRAFT_WIDTH
    assert args.max_running_requests == 64
    assert args.speculative_ngram_capacity == NGRAM_CAPACITY
    assert (args.served_model_name, args.api_key, args.tp_size) == ("policy", "k", 2)


def test_the_runtime_values_the_worker_reads() -> None:
    from sglang.srt.runtime_context import get_parallel

    from service.sglang_plugin.worker import _tp_rank

    with get_parallel().override(tp_rank=1, tp_size=2):
        assert _tp_rank() == 1
    # The weight version the worker watches is the one a weight update records.
    source = inspect.getsource(scheduler.Scheduler.record_weight_version_change)
    assert "get_serving().weight_version" in source
    assert "weight_version=new_version" in source
