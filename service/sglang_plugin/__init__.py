"""The SGLang backend: our drafts through SGLang's NGRAM verify path (sglang 0.5.23 exactly).

SGLang loads every installed entry point of its group `sglang.srt.plugins` in each of its
processes (sglang/srt/plugins/__init__.py, load_plugins); ours is register() below. It does
nothing unless DAS_SGLANG=1 (our launcher, launch.py, sets it), so installing the [sglang]
extra changes no other SGLang server. When active it wraps
SpeculativeAlgorithm.create_worker (an AROUND hook of SGLang's HookRegistry): where SGLang
would build its NGRAMWorker, it gets our subclass (worker.py). The server still runs with
--speculative-algorithm NGRAM, so SGLang's own NGRAM defaults and checks apply.

Modules: layout.py (our Draft in SGLang's tree layout; numpy only), drafting.py (the speculation
core driven by SGLang's requests; no sglang import), config.py (the speculator from DAS_*
settings), publisher.py (Redis from the scheduler process), worker.py (the NGRAMWorker
subclass; imports sglang), launch.py (`das worker --backend sglang`).
"""

from __future__ import annotations

import os
from typing import Any

ENABLE_ENV = "DAS_SGLANG"
CREATE_WORKER = "sglang.srt.speculative.spec_info.SpeculativeAlgorithm.create_worker"


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV) == "1"


def register() -> None:
    """The entry point: hook create_worker when DAS_SGLANG=1, else nothing."""
    if not enabled():
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CREATE_WORKER, create_worker, HookType.AROUND)


def create_worker(original: Any, algorithm: Any, server_args: Any, *args: Any, **kw: Any) -> Any:
    """SGLang's worker class for the algorithm, with ours in place of NGRAMWorker."""
    cls = original(algorithm, server_args, *args, **kw)
    from sglang.srt.speculative.ngram_worker import NGRAMWorker

    if cls is NGRAMWorker:
        from service.sglang_plugin.worker import das_worker_class

        return das_worker_class()
    return cls
