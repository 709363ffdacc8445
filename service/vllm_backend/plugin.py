"""The `vllm.general_plugins` entry point (pyproject.toml: das = ...:register).

vLLM loads general plugins in every process it starts, the engine core included; this one
acts only where DAS_VLLM=1 (our VllmWorker sets it), so installing the package changes
nothing for anyone else's vLLM. It may run more than once per process (vLLM's warning):
every step is idempotent.
"""

from __future__ import annotations

import logging
import os

from service.vllm_backend.config import ENABLE_ENV

log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV) == "1"


def register() -> None:
    if not enabled():
        return
    import vllm.v1.worker.gpu_model_runner as runner_module
    from vllm.platforms import current_platform
    from vllm.v1.worker.worker_base import WorkerBase

    from service.vllm_backend import sampler_fix
    from service.vllm_backend.proposer import das_rpc, patch_runner, proposer_class

    if current_platform.is_cpu() and sampler_fix.install():
        log.info("DAS: CPU rejection-sampler fix installed (vLLM issue 55005)")
    runner_module.SuffixDecodingProposer = proposer_class()
    patch_runner(runner_module.GPUModelRunner)
    WorkerBase.das_rpc = das_rpc
