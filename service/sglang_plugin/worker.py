"""DasNgramWorker: SGLang's NGRAM worker with our drafts (sglang 0.5.23 exactly).

Everything of NGRAMWorker stays (its verify step, sampling, KV moves, CUDA graphs, its
defaults and checks, which apply because the server runs --speculative-algorithm NGRAM)
except where the drafts come from:
- _prepare_draft_tokens: our speculation core's drafts for the live batch (drafting.py),
  in SGLang's layout (layout.py), instead of SGLang's corpus lookup;
- _update_ngram_corpus: nothing (SGLang's corpus stays empty; our history learns in
  BatchDrafter.drafts and when requests finish);
- forward_batch_generation: every batch, prefill included, is first shown to the drafter
  (new requests start; finished ones that left, e.g. during prefill, are finished), and a
  changed weight version moves the history to the next policy version;
- note_request_finished: the finished request goes to the history (and Redis);
- clear_cache_pool (/flush_cache, release_memory_occupation): SGLang's corpus is cleared as
  before; the rollout history is kept.
All of these run on the scheduler's thread at its deterministic events, so every
tensor-parallel rank drafts the same tokens (drafting.py).

The overrides live in DasDrafts, a mixin importable without sglang; das_worker_class() builds
the subclass (DasDrafts, NGRAMWorker) when the plugin's hook first asks for it, inside an
SGLang process.
"""

from __future__ import annotations

import atexit
import functools
import logging
from collections.abc import Callable
from typing import Any

from service.sglang_plugin.config import build_speculator, settings_from_env
from service.sglang_plugin.drafting import BatchDrafter
from service.sglang_plugin.layout import Int64Array, batch_layout
from service.sglang_plugin.publisher import ThreadedPublisher

log = logging.getLogger(__name__)


def _served_weight_version() -> Any:
    from sglang.srt.runtime_context import get_serving

    return get_serving().weight_version


def _tp_rank() -> int:
    from sglang.srt.runtime_context import get_parallel

    return int(get_parallel().tp_rank)


@functools.cache
def das_worker_class() -> type:
    """DasNgramWorker: SGLang's NGRAMWorker with DasDrafts' overrides (imports sglang)."""
    from sglang.srt.speculative.ngram_worker import NGRAMWorker

    return type("DasNgramWorker", (DasDrafts, NGRAMWorker), {"__module__": __name__})


class DasDrafts:
    """The overrides of NGRAMWorker (a mixin: NGRAMWorker follows it in the MRO)."""

    # NGRAMWorker's own attributes that the overrides read or stage, as its __init__ sets them.
    draft_token_num: int
    enable_overlap: bool
    prev_token_ids: list[int]
    prev_accept_lens: list[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # NGRAMWorker's
        settings = settings_from_env()
        publisher = ThreadedPublisher(settings) if settings.redis_url and _tp_rank() == 0 else None
        self.das_init(
            BatchDrafter(
                build_speculator(
                    settings,
                    self.draft_token_num,
                    publish=publisher.publish if publisher is not None else None,
                )
            ),
            _served_weight_version,
        )
        self._das_publisher = publisher
        if publisher is not None:
            atexit.register(publisher.close)  # flush what is buffered when SGLang exits
        log.info(
            "DAS drafts: policy %s, width %d, redis %s",
            settings.speculation_policy,
            self.draft_token_num,
            "on" if publisher is not None else "off",
        )

    def das_init(self, drafter: BatchDrafter, weight_version: Callable[[], Any]) -> None:
        """Our state (tests build the worker without SGLang's __init__ and call this)."""
        self.das = drafter
        self._das_weight_version = weight_version
        self._das_seen_version = weight_version()

    # -- the scheduler's events -----------------------------------------------------------

    def forward_batch_generation(
        self, batch: Any, on_publish: Any = None, pp_proxy_tensors: Any = None
    ) -> Any:
        version = self._das_weight_version()
        if version != self._das_seen_version:
            self._das_seen_version = version
            self.das.on_new_version()
        self.das.see(batch.reqs)
        return super().forward_batch_generation(  # type: ignore[misc]
            batch, on_publish=on_publish, pp_proxy_tensors=pp_proxy_tensors
        )

    def _prepare_draft_tokens(self, batch: Any) -> tuple[Int64Array, Int64Array]:
        bs = len(batch.reqs)
        stride = self.draft_token_num
        # Overlap scheduling processes results one step behind: last round's accepted tokens
        # are not in output_ids yet (NGRAMWorker splices them the same way).
        use_prev_tokens = self.enable_overlap and not batch.grammar_needs_sync()
        spliced: list[list[int]] | None = None
        if use_prev_tokens:
            tokens, lens = batch.spec_info.accept_tokens, batch.spec_info.accept_lens
            if not tokens.is_cpu:
                tokens, lens = tokens.cpu(), lens.cpu()
            self.prev_token_ids = tokens.tolist()
            self.prev_accept_lens = lens.tolist()
            if len(self.prev_accept_lens) != bs:
                raise RuntimeError(
                    f"overlap splice: {len(self.prev_accept_lens)} accept lengths for a batch "
                    f"of {bs}"
                )
            spliced = [
                self.prev_token_ids[i * stride : i * stride + self.prev_accept_lens[i]]
                for i in range(bs)
            ]
        else:
            self.prev_token_ids = []
            self.prev_accept_lens = [0] * bs
        drafts, roots = self.das.drafts(batch.reqs, spliced, stride)
        return batch_layout(drafts, roots, stride)

    def _update_ngram_corpus(self, batch: Any) -> None:
        """SGLang's corpus learns nothing: our history is the drafter."""

    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        # natural_stop is only "matched a stop token"; a length finish is natural for us
        # too, so the drafter reads the request's finish reason itself.
        self.das.finished(rid)

    def clear_cache_pool(self) -> None:
        self.das.sweep()  # the scheduler is idle: what has finished enters the history
        super().clear_cache_pool()  # type: ignore[misc]
