"""VllmWorker: the Worker protocol over one vLLM AsyncLLM, inside our own worker app.

Why an AsyncLLM in our app rather than vLLM's OpenAI server: every dialect (OpenAI, SGLang
/generate, vLLM /inference/v1/generate), control endpoint, typed error and metric of ours then
works unchanged, with one implementation of each, and the gateway routes to a vLLM worker as
to any other.

Drafting happens in vLLM's engine-core process (service/vllm_backend/plugin.py binds
DasProposer there). This process talks to it through vLLM's collective_rpc("das_rpc", ...),
which vLLM runs between steps on the thread that drafts, so nothing there needs a lock:
- when a sample ends, its das id, whether it ended by itself (only this process sees a stop
  string) and its final token count go to EngineDrafter.settle, which answers the sample's
  spec counters and the rollouts that joined the engine core's history; those go on to
  HistoryStore.share (Redis). One drainer task batches these calls.
- HistoryStore writes (rollouts read from Redis for a group, a new policy version) are sent
  to the engine core by the same task; its reads come from a snapshot the task refreshes.

Each of a request's n samples is its own vLLM request (n = 1, seed + i, extra_args with the
group, sample index and das id), so the engine core knows every sample by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drafter.config import DrafterConfig
from drafter.draft import Tokens
from drafter.groups import group_of
from service.errors import EngineFailure, InvalidRequest, Unavailable
from service.history_store import HistorySnapshot, HistoryStore
from service.metrics import Metrics
from service.settings import Settings
from service.vllm_backend.config import CONFIG_KEY, ENABLE_ENV, DasVllmOptions
from service.vllm_backend.drafting import GROUP_ARG, ID_ARG, SAMPLE_ARG
from service.worker import (
    FinishReason,
    GenerateRequest,
    SampleDelta,
    SampleResult,
    SamplingParams,
    SpecCounters,
    check_version_forward,
    weights_refused,
)

log = logging.getLogger(__name__)

MAX_DRAFT = 16  # vLLM's num_speculative_tokens: the cap on every draft
_SETTLE_TRIES = 200  # drainer rounds a sample may wait for vLLM to remove it (~10 s)
_DRAIN_INTERVAL_S = 0.05
_STATS_INTERVAL_S = 0.5
_SEED_RANGE = 2**63


# The config.json entries two checkpoints of one model share (the shapes vLLM loads into).
_SHAPE_KEYS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def check_checkpoint(path: Path, serving: Path) -> None:
    """Raise ValueError unless `path` is a folder with safetensors (or .bin) weights and a
    config.json of the same architecture and shapes as the model at `serving`."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ValueError(f"{path} holds no .safetensors or .bin weights")
    try:
        new = json.loads((path / "config.json").read_text())
        old = json.loads((serving / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"no readable config.json in {path}") from error
    differ = [key for key in _SHAPE_KEYS if new.get(key) != old.get(key)]
    if differ:
        raise ValueError(f"{path} is another model: {', '.join(differ)} differ")


def resolve_model(name_or_path: str) -> str:
    """A model directory vLLM can load: smollm2-135m and .gguf files become the converted
    safetensors copy that the embedded engine caches (service/engine/models.py)."""
    from service.engine.models import SMOLLM2, converted_gguf_dir, smollm2_gguf_path

    if name_or_path == SMOLLM2:
        return str(converted_gguf_dir(smollm2_gguf_path()))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(converted_gguf_dir(path))
    if path.is_dir():
        return str(path)
    raise ValueError(f"unknown model {name_or_path!r}: smollm2-135m, a .gguf file or a directory")


@dataclass(slots=True, eq=False)
class _Sample:
    index: int
    das_id: str
    seed: int
    logprobs_wanted: bool
    top_wanted: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None


class EngineHistoryView(HistorySnapshot):
    """What the HistoryStore sees of the engine core's history: writes are queued for the
    drainer (sent between vLLM's steps), reads come from the drainer's snapshot."""

    def __init__(self, config: DrafterConfig) -> None:
        super().__init__(config)
        self.queued: list[tuple[str, list[int], list[int], int]] = []
        self.version_to: int | None = None

    def add_rollout(self, group: str, output: Tokens, version: int, prompt: Tokens = ()) -> bool:
        self.queued.append((group, [int(t) for t in prompt], [int(t) for t in output], version))
        return True

    def set_version(self, version: int) -> int:
        self.version_to = max(version, self.version_to or 0)
        self._version = max(self._version, version)
        return 0


def worker_factory(engine_args: Sequence[str]) -> Callable[[Settings, HistoryStore, Metrics], Any]:
    """What create_app builds for `das worker --backend vllm ... -- ENGINE FLAGS`."""

    def build(settings: Settings, store: HistoryStore, metrics: Metrics) -> VllmWorker:
        return VllmWorker(settings, store, metrics, engine_args)

    return build


class VllmWorker:
    def __init__(
        self,
        settings: Settings,
        store: HistoryStore,
        metrics: Metrics,
        engine_args: Sequence[str] = (),
    ) -> None:
        self.store = store
        self._settings = settings
        self._metrics = metrics
        self._engine_args = list(engine_args)
        self._speculation = settings.speculation_policy != "none"
        self._options = (
            DasVllmOptions(
                policy=settings.speculation_policy,
                cost_model=settings.cost_model,
                max_draft=MAX_DRAFT,
                max_depth=store.config.max_depth,
                window=store.config.window,
                max_rollouts_per_group=store.config.max_rollouts_per_group,
                max_groups=store.config.max_groups,
                min_prob=store.config.min_prob,
                live_siblings=store.config.live_siblings,
                other_groups=store.config.other_groups,
                extend_threads=store.config.extend_threads,
            )
            if self._speculation
            else None
        )
        self._llm: Any = None
        self._tokenizer: Any = None
        self._model_path = ""
        self._view = EngineHistoryView(store.config)
        self._version = 0
        self._weights_path: str | None = None  # the weights the last update loaded
        self._paused = False
        self._closed = False
        self._requests: dict[str, list[str]] = {}  # our request id -> its samples' das ids
        self._ended: list[tuple[str, bool, int, int]] = []  # (das id, natural, length, tries)
        self._settled: dict[str, asyncio.Future[tuple[SpecCounters, str]]] = {}
        self._wake = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._stats: dict[str, Any] = {}
        self._stats_at = 0.0
        self._running = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        os.environ[ENABLE_ENV] = "1"  # vLLM's processes inherit it: our plugin acts there
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if self._settings.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
        started = time.perf_counter()
        self._model_path = await asyncio.to_thread(resolve_model, self._settings.model)
        self._llm = await asyncio.to_thread(self._build)
        self._tokenizer = self._llm.get_tokenizer()
        log.info(
            "vLLM engine for %s ready in %.1f s", self._model_path, time.perf_counter() - started
        )
        self.store.use_history(self._view)
        self._drainer = asyncio.create_task(self._drain_loop(), name="das-vllm-drainer")
        if self._options is not None and self._options.cost_model == "calibrate":
            await self._calibrate()
        await self._refresh_stats()
        await self.store.start()

    def engine_arguments(self) -> Any:
        """vLLM's AsyncEngineArgs: ours from the settings, then the extra vLLM flags."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        settings = self._settings
        argv = [
            "--model",
            self._model_path,
            "--served-model-name",
            settings.model_name,
            "--dtype",
            settings.dtype,
            "--max-model-len",
            str(settings.max_model_len),
            "--max-num-seqs",
            str(settings.max_batch),
            "--seed",
            "0",
        ]
        if settings.device == "cpu":
            argv.append("--enforce-eager")
        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
        args = AsyncEngineArgs.from_cli_args(parser.parse_args([*argv, *self._engine_args]))
        if self._options is not None:
            if args.speculative_config is None:
                args.speculative_config = {
                    "method": "suffix",
                    "num_speculative_tokens": self._options.max_draft,
                }
            extra = dict(args.additional_config or {})
            extra[CONFIG_KEY] = self._options.to_dict()
            args.additional_config = extra
        args.disable_log_stats = False
        return args

    def _build(self) -> Any:
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(self.engine_arguments())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        for future in self._settled.values():
            if not future.done():
                future.set_result((SpecCounters(), "unknown"))
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
        await self.store.close()

    # -- state --------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._settings.model_name

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def paused(self) -> bool:
        return self._paused

    def load(self) -> tuple[int, int]:
        return (self._running, 0)

    def health(self) -> dict[str, Any]:
        alive = self._llm is not None and not self._llm.errored and not self._closed
        status = "paused" if self._paused else "ok"
        return {
            "status": status if alive else "stopped",
            "model": self.model_name,
            "weight_version": self._version,
        }

    def server_info(self) -> dict[str, Any]:
        self._loaded()
        settings = self._settings
        das = self._stats
        return {
            "model_path": self._model_path,
            "weights_path": self._weights_path,
            "served_model_name": self.model_name,
            "backend": "vllm",
            "device": settings.device,
            "dtype": settings.dtype,
            "vocab_size": len(self._tokenizer),
            "eos_token_ids": [self._tokenizer.eos_token_id],
            "has_tokenizer": True,
            "speculation": self._speculation,
            "spec_policy": settings.speculation_policy,
            "cost_model": self.cost_model(),
            "max_draft": MAX_DRAFT if self._speculation else 0,
            "max_batch": settings.max_batch,
            "max_model_len": settings.max_model_len,
            "weight_version": str(self._version),
            "paused": self._paused,
            "running_requests": self._running,
            "queued_requests": 0,
            "history_groups": len(self._view.groups()),
            "history_tokens": self._view.num_tokens(),
            "redis": self.store.redis is not None,
            "redis_up": self.store.redis_up,
            "buffered_rollouts": self.store.pending,
            "engine_stats": das,
            "vllm_engine_args": self._engine_args,
        }

    def cost_model(self) -> dict[str, Any] | None:
        cost = self._stats.get("cost_model")
        if not cost:
            return None
        return {**cost, "source": self._stats.get("cost_source", "")}

    # -- tokenizer ----------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = self._loaded_tokenizer().encode(text, add_special_tokens=False)
        return ids

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self._loaded_tokenizer().decode(
            list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return text

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        tokenizer = self._loaded_tokenizer()
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidRequest(f"model {self._settings.model!r} has no chat template")
        ids = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(t) for t in ids]

    def _loaded_tokenizer(self) -> Any:
        self._loaded()
        return self._tokenizer

    # -- control ------------------------------------------------------------------------

    async def abort(self, request_id: str | None = None) -> int:
        llm = self._ready()
        ids = list(self._requests) if request_id is None else [request_id]
        samples = [das_id for rid in ids for das_id in self._requests.get(rid, ())]
        if samples:
            await llm.abort(samples)
        return sum(rid in self._requests for rid in ids)

    async def pause(self) -> None:
        # "keep": running requests stay in vLLM's queue, frozen, and go on after resume().
        await self._ready().pause_generation(mode="keep", clear_cache=False)
        self._paused = True

    async def resume(self) -> None:
        await self._ready().resume_generation()
        self._paused = False

    async def update_weights(self, path: str) -> int:
        return await self._update_weights(path, self._version + 1)

    async def update_weights_to(self, path: str, version: int) -> int:
        check_version_forward(version, self._version)
        return await self._update_weights(path, version)

    async def _update_weights(self, path: str, version: int) -> int:
        """vLLM reloads the weights at `path` in place; they are policy `version` from now."""
        if not path:
            raise InvalidRequest("model_path must not be empty", "model_path")
        llm = self._ready()
        try:
            # Checked here first: a loader error inside vLLM's engine core can leave the
            # engine dead, so what vLLM is handed must at least be a checkpoint of this model.
            await asyncio.to_thread(check_checkpoint, Path(path), Path(self._model_path))
            await llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        except Exception as error:  # not a checkpoint of this model, or vLLM's loader refused it
            raise weights_refused(path, error) from error
        self._version, self._weights_path = version, path
        await self.store.set_version(version)  # the view forwards it to the engine core
        self._wake.set()
        return version

    async def flush_cache(self) -> None:
        # The prefix (KV) cache only: the rollout history lives in the proposer, untouched.
        await self._ready().reset_prefix_cache()

    # -- generation ---------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> list[SampleResult]:
        results: dict[int, SampleResult] = {}
        async for delta in self._run(request, stream=False):
            assert isinstance(delta, SampleResult)
            results[delta.index] = delta
        return [results[i] for i in sorted(results)]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[SampleDelta]:
        async for delta in self._run(request, stream=True):
            assert isinstance(delta, SampleDelta)
            yield delta

    async def _run(
        self, request: GenerateRequest, stream: bool
    ) -> AsyncIterator[SampleResult | SampleDelta]:
        llm = self._ready()
        rid = request.request_id
        if rid in self._requests:
            raise InvalidRequest(f"request id {rid!r} is already running")
        params = request.params
        group = group_of(request.group, request.prompt_token_ids)
        await self.store.ensure_group(group)
        base_seed = params.seed if params.seed is not None else random.randrange(_SEED_RANGE)
        samples = [
            _Sample(
                i, f"{rid}#{i}", (base_seed + i) % _SEED_RANGE, params.logprobs, params.top_logprobs
            )
            for i in range(params.n)
        ]
        self._requests[rid] = [s.das_id for s in samples]
        self._running += params.n
        queue: asyncio.Queue[tuple[_Sample, Any] | BaseException] = asyncio.Queue()
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        tasks = [
            asyncio.create_task(
                self._pump(llm, prompt, self._vllm_params(params, s, group), s, queue)
            )
            for s in samples
        ]
        remaining = params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                sample, piece = item
                if piece is None:  # the sample ended: wait for its counters
                    remaining -= 1
                    spec, klass = await self._settle(sample)
                    if stream:
                        yield self._delta(sample, [], [], [], "", spec, klass, final=True)
                    else:
                        yield self._result(sample, spec, klass)
                elif stream:
                    tokens, logprobs, tops, text = piece
                    if tokens or text:
                        yield self._delta(sample, tokens, logprobs, tops, text, None, "", False)
        finally:
            self._running -= params.n
            self._requests.pop(rid, None)
            if remaining:  # the caller went away, or a sample failed: free vLLM's work
                for task in tasks:
                    task.cancel()
                with contextlib.suppress(Exception):
                    await llm.abort([s.das_id for s in samples if s.finish_reason is None])

    def _vllm_params(self, params: SamplingParams, sample: _Sample, group: str) -> Any:
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VllmParams

        logprobs = params.top_logprobs if params.logprobs else None
        try:
            return VllmParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else 0,
                seed=sample.seed,
                max_tokens=params.max_tokens,
                stop=list(params.stop) or None,
                stop_token_ids=list(params.stop_token_ids) or None,
                ignore_eos=params.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=params.skip_special_tokens,
                include_stop_str_in_output=params.no_stop_trim,
                output_kind=RequestOutputKind.DELTA,
                extra_args={GROUP_ARG: group, SAMPLE_ARG: sample.index, ID_ARG: sample.das_id},
            )
        except ValueError as error:
            raise InvalidRequest(str(error)) from error

    async def _pump(
        self,
        llm: Any,
        prompt: dict[str, Any],
        vllm_params: Any,
        sample: _Sample,
        queue: asyncio.Queue[tuple[_Sample, Any] | BaseException],
    ) -> None:
        """Feed one sample's vLLM output into the request's queue, piece by piece."""
        try:
            async for output in llm.generate(prompt, vllm_params, request_id=sample.das_id):
                completion = output.outputs[0]
                tokens = list(completion.token_ids)
                logprobs: list[float] = []
                tops: list[dict[int, float]] = []
                if sample.logprobs_wanted and completion.logprobs is not None:
                    for token, position in zip(tokens, completion.logprobs, strict=True):
                        logprobs.append(float(position[token].logprob))
                        if sample.top_wanted:
                            tops.append(_top(position, sample.top_wanted))
                sample.tokens += tokens
                sample.text += completion.text
                sample.logprobs += logprobs
                sample.top_logprobs += tops
                if completion.finish_reason is not None:
                    sample.finish_reason = _finish_reason(completion.finish_reason)
                    sample.matched_stop = completion.stop_reason
                    if sample.finish_reason == "stop" and sample.matched_stop is None:
                        sample.matched_stop = sample.tokens[-1] if sample.tokens else None  # EOS
                queue.put_nowait((sample, (tokens, logprobs, tops, completion.text)))
                if output.finished:
                    break
        except asyncio.CancelledError:
            raise
        except (ValueError, TypeError) as error:  # vLLM refused the request as sent
            queue.put_nowait(InvalidRequest(str(error)))
            return
        except Exception as error:  # the engine died or a step failed
            log.exception("vLLM request %s failed", sample.das_id)
            failure = EngineFailure()
            failure.__cause__ = error
            queue.put_nowait(failure)
            return
        if sample.finish_reason is None:
            sample.finish_reason = "abort"
        queue.put_nowait((sample, None))

    def _result(self, sample: _Sample, spec: SpecCounters, klass: str) -> SampleResult:
        assert sample.finish_reason is not None
        return SampleResult(
            index=sample.index,
            token_ids=sample.tokens,
            text=sample.text,
            logprobs=sample.logprobs if sample.logprobs_wanted else None,
            top_logprobs=sample.top_logprobs if sample.top_wanted else None,
            finish_reason=sample.finish_reason,
            matched_stop=sample.matched_stop,
            seed=sample.seed,
            spec=spec,
            weight_version=self._version,
            length_class=klass,
        )

    def _delta(
        self,
        sample: _Sample,
        tokens: list[int],
        logprobs: list[float],
        tops: list[dict[int, float]],
        text: str,
        spec: SpecCounters | None,
        klass: str,
        final: bool,
    ) -> SampleDelta:
        return SampleDelta(
            index=sample.index,
            token_ids=tokens,
            text=text,
            logprobs=logprobs if sample.logprobs_wanted else None,
            top_logprobs=tops if sample.top_wanted else None,
            finish_reason=sample.finish_reason if final else None,
            matched_stop=sample.matched_stop if final else None,
            seed=sample.seed,
            spec=spec or SpecCounters(),
            weight_version=self._version,
            length_class=klass or "unknown",
        )

    async def _calibrate(self) -> None:
        """Requests whose steps the engine core times to fit its cost model: prefills of 8
        to 128 tokens and one-token decodes, one at a time (about a second on this CPU).
        They are settled as aborted, so they never enter the history."""
        from vllm.sampling_params import SamplingParams as VllmParams

        rng = random.Random(0)
        vocab = len(self._tokenizer)
        for round_ in range(3):
            for size in (8, 16, 32, 64, 128):
                das_id = f"das-calibrate-{round_}-{size}"
                prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(size)]}
                params = VllmParams(max_tokens=4, temperature=0.0, ignore_eos=True)
                params.extra_args = {ID_ARG: das_id}
                async for _ in self._llm.generate(prompt, params, request_id=das_id):
                    pass
                sample = _Sample(0, das_id, 0, False, 0, finish_reason="abort")
                await self._settle(sample)
        stats = await self._rpc("stats")
        if stats is not None and stats["cost_source"] == "calibrating":
            log.warning("DAS cost model still calibrating after start-up: no drafts until then")

    # -- the engine core's drafter ------------------------------------------------------

    async def _settle(self, sample: _Sample) -> tuple[SpecCounters, str]:
        """Tell the engine core the sample ended (and how); its counters and length class."""
        if self._options is None or self._closed:
            return SpecCounters(), "unknown"
        natural = sample.finish_reason in ("stop", "length")
        future: asyncio.Future[tuple[SpecCounters, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self._settled[sample.das_id] = future
        self._ended.append((sample.das_id, natural, len(sample.tokens), 0))
        self._wake.set()
        return await future

    async def _drain_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _STATS_INTERVAL_S)
            self._wake.clear()
            try:
                await self._drain_once()
                if time.monotonic() - self._stats_at > _STATS_INTERVAL_S:
                    await self._refresh_stats()
            except asyncio.CancelledError:
                raise
            except Exception:  # the engine is gone: answer the waiters, keep the loop
                log.exception("vLLM drafter RPC failed")
                for das_id, *_ in self._ended:
                    self._answer(das_id, SpecCounters(), "unknown")
                self._ended.clear()
            if self._ended:  # samples vLLM has not removed yet: retry soon
                await asyncio.sleep(_DRAIN_INTERVAL_S)
                self._wake.set()

    async def _drain_once(self) -> None:
        if self._options is None:
            return
        view = self._view
        if view.version_to is not None:
            version, view.version_to = view.version_to, None
            await self._rpc("set_version", version)
        if view.queued:
            rollouts, view.queued = view.queued, []
            await self._rpc("add_rollouts", rollouts)
        if not self._ended:
            return
        ended, self._ended = self._ended, []
        answer = await self._rpc("settle", [(d, natural, n) for d, natural, n, _ in ended])
        if answer is None:  # no DasProposer in the engine core
            for das_id, *_ in ended:
                self._answer(das_id, SpecCounters(), "unknown")
            return
        for das_id, counters in answer["counters"].items():
            forwards, drafted, accepted, klass, drafted_by, accepted_by = counters
            spec = SpecCounters(forwards, drafted, accepted, drafted_by, accepted_by)
            self._answer(das_id, spec, klass)
        for group, prompt, output, version in answer["rollouts"]:
            self.store.share(group, prompt, output, version)
            view.lengths.setdefault(group, []).append(len(output))
        pending = set(answer["pending"])
        for das_id, natural, length, tries in ended:
            if das_id not in pending:
                continue
            if tries >= _SETTLE_TRIES:  # ended in prefill, never drafted: nothing to record
                self._answer(das_id, SpecCounters(), "unknown")
            else:
                self._ended.append((das_id, natural, length, tries + 1))

    async def _refresh_stats(self) -> None:
        self._stats_at = time.monotonic()
        if self._options is None:
            return
        stats = await self._rpc("stats")
        lengths = await self._rpc("group_lengths")
        if stats is not None:
            self._stats = stats
            self._view.tokens = int(stats["history_tokens"])
        if lengths is not None:
            self._view.lengths = lengths
        cost = self.cost_model()
        if cost is not None:
            gauge = self._metrics.cost_model
            gauge.labels(worker=self._settings.worker_name, term="c_base").set(cost["c_base"])
            gauge.labels(worker=self._settings.worker_name, term="c_tok").set(cost["c_tok"])

    async def _rpc(self, name: str, *args: Any) -> Any:
        answers = await self._llm.collective_rpc("das_rpc", args=(name, *args))
        return answers[0] if answers else None

    def _answer(self, das_id: str, spec: SpecCounters, klass: str) -> None:
        future = self._settled.pop(das_id, None)
        if future is not None and not future.done():
            future.set_result((spec, klass))

    # -- helpers ------------------------------------------------------------------------

    def _loaded(self) -> Any:
        if self._llm is None:
            raise Unavailable("the model is not loaded yet")
        return self._llm

    def _ready(self) -> Any:
        if self._closed:
            raise Unavailable("the worker is shutting down")
        llm = self._loaded()
        if llm.errored:
            raise Unavailable("the vLLM engine has stopped")
        return llm


def _top(position: dict[int, Any], k: int) -> dict[int, float]:
    """The k most likely tokens at a position (vLLM adds the sampled one, ranked, too)."""
    return {token: float(lp.logprob) for token, lp in position.items() if lp.rank and lp.rank <= k}


def _finish_reason(reason: str) -> FinishReason:
    if reason in ("stop", "length"):
        return reason  # type: ignore[return-value]
    return "abort"
