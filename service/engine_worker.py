"""EngineWorker: the Worker protocol over one embedded torch Engine.

Threading model. The engine (model, KV cache, rollout history, speculation policy) belongs to
one dedicated thread, which loops: apply every queued command (add a request, abort, pause,
resume, flush the KV cache, load weights, add a rollout to the history), then run one step
while there is unpaused work; with none it blocks on the command queue, so an idle worker
burns no CPU. The asyncio side never touches the engine: it puts commands on a thread-safe
queue, and the engine thread answers through asyncio futures and per-request asyncio queues,
always via loop.call_soon_threadsafe. After a step the thread sends each streaming request
the tokens its samples gained (Engine.progress); a finished or aborted request gets its final
output.

History. The engine's RolloutHistory is this worker's local history, and it is not
thread-safe, so the HistoryStore (Redis sharing) gets a view of it instead: the store's
writes (rollouts read from Redis, version changes) become engine commands, and its reads
(groups, token counts, lengths) come from a snapshot the engine thread keeps. As FakeWorker
does, a request first awaits store.ensure_group (the group's shared rollouts are queued ahead
of the request). A rollout that ends by itself enters the local history on the engine thread
at once (the speculation core records it) and is handed to store.share for Redis, and so for
every other worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drafter import RolloutHistory
from drafter.draft import Tokens
from drafter.groups import group_of
from drafter.speculator import Rollout
from service.engine import Engine, EngineConfig, RequestOutput
from service.engine.engine import SampleProgress
from service.engine.models import load_model
from service.errors import EngineFailure, InvalidRequest, Unavailable
from service.history_store import HistorySnapshot, HistoryStore
from service.metrics import Metrics
from service.settings import Settings
from service.worker import (
    GenerateRequest,
    SampleDelta,
    SampleResult,
    SamplingParams,
    check_version_forward,
    weights_refused,
)

log = logging.getLogger(__name__)

_TOKENS_REFRESH_S = 0.25  # how stale the history token count and the cost curve metric may get


@dataclass(frozen=True, slots=True)
class _Command:
    run: Callable[[Engine], Any]  # runs on the engine thread
    done: asyncio.Future[Any] | None = None  # its result or error, on the event loop


_STOP = None  # the command that ends the engine thread

# What the engine thread sends one request: pieces of its samples after a step (streams), its
# output (generate), or why it failed.
_Event = list[SampleProgress] | RequestOutput | BaseException


@dataclass(slots=True, eq=False)
class _Live:
    request: GenerateRequest
    stream: bool
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    # Engine thread only: output tokens and text characters sent so far, and whether the final
    # piece went out.
    sent: list[int] = field(default_factory=list)
    sent_text: list[int] = field(default_factory=list)
    final: list[bool] = field(default_factory=list)


class HistoryView(HistorySnapshot):
    """What the HistoryStore sees of the engine thread's RolloutHistory: writes become engine
    commands (applied in order, between steps), reads come from the thread's snapshot (written
    by the engine thread only; the loop reads single keys or copies in one C-level call, which
    the GIL keeps whole)."""

    def __init__(self, history: RolloutHistory, submit: Callable[[_Command], None]) -> None:
        super().__init__(history.config, history.version)
        self._submit = submit

    # -- writes (any thread but the engine's: they are queued) ----------------------------

    def add_rollout(self, group: str, output: Tokens, version: int, prompt: Tokens = ()) -> bool:
        """Queue a rollout for the history; True (it may still fall outside the window)."""
        tokens, bridge = np.array(output, dtype=np.int32), np.array(prompt, dtype=np.int32)
        self._submit(_Command(lambda engine: self._add(engine, group, tokens, version, bridge)))
        return True

    def set_version(self, version: int) -> int:
        """Queue a move to `version` (a no-op if the engine is there already); 0."""
        self._submit(_Command(lambda engine: self._set_version(engine, version)))
        return 0

    # -- the engine thread ----------------------------------------------------------------

    def _add(
        self, engine: Engine, group: str, tokens: Tokens, version: int, prompt: Tokens
    ) -> None:
        if engine.history.add_rollout(group, tokens, version, prompt):
            self.note_group(engine.history, group)

    def _set_version(self, engine: Engine, version: int) -> None:
        if version > engine.history.version:
            engine.history.set_version(version)
        self.note_all(engine.history)

    def note_group(self, history: RolloutHistory, group: str) -> None:
        lengths = history.recent_lengths(group)
        if lengths:
            self.lengths[group] = lengths  # a new list: the reader's copy stays whole
        else:
            self.lengths.pop(group, None)

    def note_all(self, history: RolloutHistory) -> None:
        """After evictions (a version change): rebuild the snapshot."""
        self.lengths = {group: history.recent_lengths(group) for group in history.groups()}
        self._version = history.version
        self.note_tokens(history)

    def note_tokens(self, history: RolloutHistory) -> None:
        self.tokens = history.num_tokens()


class EngineWorker:
    def __init__(self, settings: Settings, store: HistoryStore, metrics: Metrics) -> None:
        self.store = store
        self._settings = settings
        self._config = EngineConfig(
            model=settings.model,
            device=settings.device,
            dtype=settings.dtype,
            max_batch=settings.max_batch,
            max_model_len=settings.max_model_len,
            speculation=settings.speculation_policy,
            cost_model=settings.cost_model,
            deterministic=settings.deterministic,
            drafter=dataclasses.replace(store.config, tree_drafts=settings.tree_drafts),
        )
        self._metrics = metrics
        self._engine: Engine | None = None
        self._view: HistoryView | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._requests: set[_Live] = set()  # event loop side: requests not yet answered
        self._live: dict[str, _Live] = {}  # engine thread side: requests in the engine
        self._closed = False
        self._paused = False
        self._version = 0
        self._weights_path: str | None = None  # the weights the last update loaded
        self._load = (0, 0)  # (running, waiting) sequences, published by the engine thread
        self._tokens_at = 0.0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (the app only answers once this returns) and start the thread."""
        config = self._config
        log.info("loading model %s on %s (%s)", config.model, config.device, config.dtype)
        started = time.perf_counter()
        self._loop = asyncio.get_running_loop()
        self._engine = engine = await asyncio.to_thread(self._build)
        log.info(
            "model %s ready in %.1f s: speculation %s, max batch %d",
            config.model,
            time.perf_counter() - started,
            engine.policy.name,
            config.max_batch,
        )
        cost = engine.cost
        if cost is not None:
            gauge = self._metrics.cost_model
            gauge.labels(worker=self._settings.worker_name, term="c_base").set(cost.c_base)
            gauge.labels(worker=self._settings.worker_name, term="c_tok").set(cost.c_tok)
        self._note_cost_curve(engine)
        self._thread = threading.Thread(target=self._run, name="das-engine", daemon=True)
        self._thread.start()
        await self.store.start()

    def _build(self) -> Engine:
        engine = Engine(self._config, publish=self._publish)
        view = HistoryView(engine.history, self._put)
        view.note_all(engine.history)
        self._view = view
        # The store feeds the engine thread's history through the view (see the module
        # docstring); its gauges read the view's snapshot.
        self.store.use_history(view)
        return engine

    async def close(self) -> None:
        """Stop the engine thread; requests still running end with their partial output."""
        if not self._closed:
            self._closed = True
            if self._thread is not None:
                self._commands.put(_STOP)
                await asyncio.to_thread(self._thread.join)
        for live in list(self._requests):  # never reached the engine
            live.events.put_nowait(Unavailable("the worker is shutting down"))
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
        """(running, queued) sequences (samples): decoding, and waiting for a KV slot or a
        paused engine."""
        return self._load

    def health(self) -> dict[str, Any]:
        alive = self._thread is not None and self._thread.is_alive()
        status = "paused" if self._paused else "ok"
        return {
            "status": status if alive else "stopped",
            "model": self.model_name,
            "weight_version": self._version,
        }

    def server_info(self) -> dict[str, Any]:
        engine = self._loaded()
        running, queued = self._load
        config = self._config
        return {
            "model_path": config.model,
            "weights_path": self._weights_path,
            "served_model_name": self.model_name,
            "backend": "engine",
            "device": config.device,
            "dtype": config.dtype,
            "vocab_size": engine.runner.vocab_size,
            "eos_token_ids": sorted(engine.eos_token_ids),
            "has_tokenizer": engine.tokenizer is not None,
            "speculation": engine.speculator.drafting,
            "spec_policy": config.speculation,
            "cost_model": self.cost_model(),
            "max_draft": config.max_draft,
            "max_batch": config.max_batch,
            "max_model_len": config.max_model_len,
            "weight_version": str(self._version),
            "paused": self._paused,
            "running_requests": running,
            "queued_requests": queued,
            "history_groups": len(self.store.history.groups()),
            "history_tokens": self.store.history.num_tokens(),
            "redis": self.store.redis is not None,
            "redis_up": self.store.redis_up,
            "buffered_rollouts": self.store.pending,
            "engine_stats": dataclasses.asdict(engine.stats),
        }

    def cost_model(self) -> dict[str, Any] | None:
        """The cost model the engine's policy prices drafts with, and where it came from."""
        engine = self._loaded()
        cost = engine.cost
        if cost is None:
            return None
        model: dict[str, Any] = {**cost.to_json(), "source": engine.cost_source}
        curve = engine.speculator.cost_curve
        if curve is not None:
            model["by_batch_size"] = curve.to_json()
        return model

    # -- tokenizer ----------------------------------------------------------------------

    def _tokenizer(self) -> Any:
        tokenizer = self._loaded().tokenizer
        if tokenizer is None:
            raise InvalidRequest(
                f"model {self._config.model!r} has no tokenizer: send prompt token ids"
            )
        return tokenizer

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer().encode(text, add_special_tokens=False)
        return ids

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of the tokens; "" for a model without a tokenizer (its outputs have no text)."""
        tokenizer = self._loaded().tokenizer
        if tokenizer is None:
            return ""
        text: str = tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        return text

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        tokenizer = self._tokenizer()
        if tokenizer.chat_template is None:
            raise InvalidRequest(f"model {self._config.model!r} has no chat template")
        ids = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(t) for t in ids]

    # -- control ------------------------------------------------------------------------

    async def abort(self, request_id: str | None = None) -> int:
        count: int = await self._call(lambda engine: self._abort(engine, request_id))
        return count

    async def pause(self) -> None:
        await self._call(Engine.pause)
        self._paused = True

    async def resume(self) -> None:
        await self._call(Engine.resume)
        self._paused = False

    async def update_weights(self, path: str) -> int:
        return await self._update_weights(path, None)

    async def update_weights_to(self, path: str, version: int) -> int:
        check_version_forward(version, self._version)
        return await self._update_weights(path, version)

    async def _update_weights(self, path: str, to: int | None) -> int:
        """Load the weights at `path` as policy version `to` (None: the next one)."""
        if not path:
            raise InvalidRequest("model_path must not be empty", "model_path")
        config = self._config
        try:
            # Loaded off both threads: the engine keeps stepping meanwhile.
            model, _ = await asyncio.to_thread(load_model, path, config.device, config.torch_dtype)
            version: int = await self._call(lambda engine: self._load_weights(engine, model, to))
        except (ValueError, OSError) as error:  # no checkpoint there, or one of another shape
            raise weights_refused(path, error) from error
        self._version, self._weights_path = version, path
        await self.store.set_version(version)  # trims the shared streams to the window
        return version

    async def flush_cache(self) -> None:
        await self._call(Engine.flush_cache)  # KV caches only: the history is untouched

    # -- generation ---------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> list[SampleResult]:
        live = await self._submit(request, stream=False)
        answered = False
        try:
            event = await live.events.get()
            answered = True
            if isinstance(event, BaseException):
                raise event
            assert isinstance(event, RequestOutput)
            return event.samples
        finally:
            self._requests.discard(live)
            if not answered:  # the caller went away: free the engine's work
                self._abort_soon(request.request_id)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[SampleDelta]:
        live = await self._submit(request, stream=True)
        params = request.params
        remaining = params.n
        try:
            while remaining:
                event = await live.events.get()
                if isinstance(event, BaseException):
                    remaining = 0  # the engine holds the request no more (or never did)
                    raise event
                assert isinstance(event, list)
                for piece in event:
                    remaining -= piece.result is not None
                    yield self._delta(piece, params)
        finally:
            self._requests.discard(live)
            if remaining:
                self._abort_soon(request.request_id)

    async def _submit(self, request: GenerateRequest, stream: bool) -> _Live:
        """Queue the request for the engine thread, which admits it (and refuses an id that is
        already running: the one duplicate check) or answers its error."""
        self._ready()
        live = _Live(request, stream)
        self._requests.add(live)
        try:
            # The group's shared rollouts are queued for the history ahead of the request.
            await self.store.ensure_group(group_of(request.group, request.prompt_token_ids))
            if self._closed:
                raise Unavailable("the worker is shutting down")
            self._put(_Command(lambda engine: self._admit(engine, live)))
        except BaseException:
            self._requests.discard(live)
            raise
        return live

    def _delta(self, piece: SampleProgress, params: SamplingParams) -> SampleDelta:
        result = piece.result
        return SampleDelta(
            index=piece.index,
            token_ids=piece.token_ids,
            text=piece.text,
            logprobs=piece.logprobs if params.logprobs else None,
            top_logprobs=piece.top_logprobs if params.top_logprobs else None,
            finish_reason=None if result is None else result.finish_reason,
            matched_stop=None if result is None else result.matched_stop,
            seed=piece.seed,
            spec=piece.spec,
            weight_version=self._version if result is None else result.weight_version,
            length_class="unknown" if result is None else result.length_class,
        )

    # -- the event loop's side of the queue ---------------------------------------------

    def _loaded(self) -> Engine:
        if self._engine is None:
            raise Unavailable("the model is not loaded yet")
        return self._engine

    def _ready(self) -> Engine:
        """The engine, if it still takes commands."""
        if self._closed:
            raise Unavailable("the worker is shutting down")
        return self._loaded()

    def _put(self, command: _Command) -> None:
        self._commands.put(command)

    async def _call(self, run: Callable[[Engine], Any]) -> Any:
        """Run `run(engine)` on the engine thread between steps; its result."""
        self._ready()
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put(_Command(run, done))
        return await done

    def _abort_soon(self, request_id: str) -> None:
        if not self._closed and self._engine is not None:
            self._put(_Command(lambda engine: self._abort(engine, request_id)))

    # -- the engine thread --------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        view = self._view
        assert engine is not None and view is not None
        while True:
            idle = engine.paused or not engine.has_unfinished()
            if idle:
                self._note_state(engine, view)
            commands = [self._commands.get()] if idle else []  # block: nothing else to do
            with contextlib.suppress(queue.Empty):
                while True:
                    commands.append(self._commands.get_nowait())
            for command in commands:
                if command is _STOP:
                    self._stop(engine)
                    return
                self._apply(engine, command)
            self._load = (engine.num_running(), engine.num_waiting())
            if engine.has_unfinished() and not engine.paused:
                self._step(engine)
            now = time.monotonic()
            if now - self._tokens_at > _TOKENS_REFRESH_S:
                self._tokens_at = now
                self._note_state(engine, view)

    def _note_state(self, engine: Engine, view: HistoryView) -> None:
        """What the other threads read of the engine's state, every _TOKENS_REFRESH_S while
        it decodes and whenever it falls idle: the history's token count, the cost curve."""
        view.note_tokens(engine.history)
        self._note_cost_curve(engine)

    def _note_cost_curve(self, engine: Engine) -> None:
        """Export the cost curve's line per calibrated batch size, as re-timed so far."""
        curve = engine.speculator.cost_curve
        if curve is None:
            return
        gauge, worker = self._metrics.step_cost, self._settings.worker_name
        for point in curve.to_json():
            rows = str(int(point["rows"]))
            gauge.labels(worker=worker, rows=rows, term="c_base").set(point["c_base"])
            gauge.labels(worker=worker, rows=rows, term="c_tok").set(point["c_tok"])

    def _apply(self, engine: Engine, command: _Command) -> None:
        try:
            result = command.run(engine)
        except Exception as error:  # the caller's error (a bad path, an unknown id): theirs
            if command.done is None:
                log.exception("engine command failed")
            else:
                self._answer(command.done, None, error)
        else:
            if command.done is not None:
                self._answer(command.done, result, None)

    def _step(self, engine: Engine) -> None:
        try:
            finished = engine.step()
        except Exception as error:  # a failed forward must not end the thread: fail the batch
            log.exception("engine step failed; aborting %d requests", len(self._live))
            engine.abort_all()
            engine.flush_cache()
            for live in list(self._live.values()):
                failure = EngineFailure()  # its message is fixed: the cause is for the log
                failure.__cause__ = error
                self._send(live, failure)
            self._live.clear()
            self._load = (0, 0)
            return
        # Published before the outputs, so a caller that got its answer sees the load after.
        self._load = (engine.num_running(), engine.num_waiting())
        for output in finished:
            self._finish(output)
        for live in self._live.values():
            if live.stream:
                rid = live.request.request_id
                self._send_pieces(live, engine.progress(rid, live.sent, live.sent_text))

    def _admit(self, engine: Engine, live: _Live) -> None:
        try:
            engine.add_request(live.request, stream_text=live.stream)
        except ValueError as error:
            self._send(live, InvalidRequest(str(error)))
            return
        n = live.request.params.n
        live.sent, live.sent_text, live.final = [0] * n, [0] * n, [False] * n
        self._live[live.request.request_id] = live

    def _abort(self, engine: Engine, request_id: str | None) -> int:
        ids = list(self._live) if request_id is None else [request_id]
        count = 0
        for rid in ids:
            output = engine.abort(rid)
            if output is not None:
                self._finish(output)
                count += 1
        return count

    def _load_weights(self, engine: Engine, model: Any, version: int | None) -> int:
        version = engine.load_weights(model, version)
        assert self._view is not None
        self._view.note_all(engine.history)
        return version

    def _stop(self, engine: Engine) -> None:
        for output in engine.abort_all():
            self._finish(output)
        # Commands that never ran: their callers get an error rather than wait forever.
        with contextlib.suppress(queue.Empty):
            while True:
                command = self._commands.get_nowait()
                if command is not None and command.done is not None:
                    self._answer(command.done, None, Unavailable("the worker is shutting down"))

    def _finish(self, output: RequestOutput) -> None:
        live = self._live.pop(output.request_id, None)
        if live is None:
            return
        if not live.stream:
            self._send(live, output)
            return
        pieces = []
        for sample in output.samples:
            i = sample.index
            if live.final[i]:
                continue
            start = live.sent[i]
            pieces.append(
                SampleProgress(
                    index=i,
                    start=start,
                    token_ids=sample.token_ids[start:],
                    logprobs=(sample.logprobs or [])[start:],
                    top_logprobs=(sample.top_logprobs or [])[start:],
                    text=sample.text[live.sent_text[i] :],
                    spec=sample.spec,
                    seed=sample.seed,
                    result=sample,
                )
            )
        self._send(live, pieces)

    def _send_pieces(self, live: _Live, progress: list[SampleProgress]) -> None:
        pieces = []
        for piece in progress:
            i = piece.index
            if live.final[i] or not (piece.token_ids or piece.result is not None):
                continue
            live.sent[i] += len(piece.token_ids)
            live.sent_text[i] += len(piece.text)
            live.final[i] = piece.result is not None
            pieces.append(piece)
        if pieces:
            self._send(live, pieces)

    def _send(self, live: _Live, event: _Event) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(live.events.put_nowait, event)

    def _answer(self, done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if done.done():  # the caller was cancelled
                return
            if error is None:
                done.set_result(result)
            else:
                done.set_exception(error)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    def _publish(self, rollout: Rollout) -> None:
        """A rollout ended by itself and entered the engine's history (engine thread): update
        the snapshot and hand it to the store for Redis."""
        assert self._loop is not None and self._view is not None and self._engine is not None
        self._view.note_group(self._engine.history, rollout.group)
        share = self.store.share
        self._loop.call_soon_threadsafe(
            share, rollout.group, rollout.prompt, rollout.output, rollout.version
        )
