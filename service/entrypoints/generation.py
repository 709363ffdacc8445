"""What every dialect needs to run requests on the worker, and nothing dialect-specific.

Generation runs one API request (one or more prompts, the same SamplingParams) on the worker:
whole (run_all) or as a stream of SSE lines (stream). It keeps the map from a client's request
id to the worker's request ids that /abort_request uses, counts tokens and speculation in the
metrics, and turns errors into the service's typed errors (service.errors). A stream is handed
back only after its first event exists, so a request that cannot start still gets its error
status; a failure after that is sent as an SSE error event in the same OpenAI shape.

No FastAPI here: the dialect modules build the wire responses, their routers serialise them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from service.errors import (
    InternalError,
    InvalidRequest,
    NotFound,
    ServiceError,
    error_response,
    status_of,
)
from service.limits import FAKE_MAX_MODEL_LEN, OPENAI_FIELDS, Fields, Limits
from service.metrics import Metrics
from service.protocol import SpecInfo, UsageInfo
from service.worker import (
    GenerateRequest,
    SampleDelta,
    SampleResult,
    SamplingParams,
    SpecCounters,
    Worker,
)

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"

T = TypeVar("T")
# A dialect's stream: the SSE text for one delta of prompt p, and the closing event (the
# samples' final deltas, completion tokens in all) or None for none.
Chunk = Callable[[int, SampleDelta], str]
Tail = Callable[[list[SampleDelta], int], str]


@dataclass(slots=True, eq=False)
class _Admitted:
    samples: int  # n for each prompt, summed: what the request holds of the worker


@dataclass(slots=True)
class Prompt:
    token_ids: list[int]
    request_id: str  # the worker's request id ("": named by Generation from the API's id)


def to_prompt(token_ids: list[int], request_id: str = "") -> Prompt:
    if not token_ids:
        raise InvalidRequest("prompt must not be empty", "prompt")
    return Prompt(token_ids, request_id)


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def spec_info(counters: SpecCounters) -> SpecInfo:
    return SpecInfo(
        forward_passes=counters.forward_passes,
        drafted_tokens=counters.drafted_tokens,
        accepted_tokens=counters.accepted_tokens,
    )


def total_spec(samples: Sequence[SampleResult | SampleDelta]) -> SpecInfo:
    total = SpecCounters()
    for sample in samples:
        total.add(sample.spec)
    return spec_info(total)


def usage(prompts: Sequence[Prompt], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def output_tokens(samples: Sequence[SampleResult]) -> int:
    return sum(len(s.token_ids) for s in samples)


class Generation:
    """One worker as the dialects see it."""

    def __init__(
        self, worker: Worker, metrics: Metrics, worker_name: str, limits: Limits | None = None
    ) -> None:
        self.worker = worker
        self.name = worker_name
        self.limits = limits or Limits(FAKE_MAX_MODEL_LEN)
        self._active: dict[str, list[str]] = {}  # client request id -> worker request ids
        self._samples: dict[str, _Admitted] = {}  # client request id -> its admission
        self.inflight_samples = 0  # samples of the requests running or queued here
        labels = {"worker": worker_name}
        self._prompt_tokens = metrics.prompt_tokens.labels(**labels)
        self._generated = metrics.generated_tokens
        self._forwards = metrics.forward_passes
        self._drafted = metrics.drafted_tokens
        self._accepted = metrics.accepted_tokens
        self._source_drafted = metrics.source_drafted_tokens
        self._source_accepted = metrics.source_accepted_tokens
        self._accept_rate = metrics.accepted_per_forward.labels(**labels)
        self._lengths = metrics.generation_length
        self._finished = metrics.finished
        metrics.running.labels(**labels).set_function(lambda: worker.load()[0])
        metrics.queued.labels(**labels).set_function(lambda: worker.load()[1])
        metrics.policy_version.labels(**labels).set_function(lambda: worker.weight_version)

    @property
    def model_name(self) -> str:
        return self.worker.model_name

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.worker.model_name:
            raise NotFound(f"The model `{model}` does not exist.", "model")

    async def run_all(
        self,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        group: str | None,
        fields: Fields = OPENAI_FIELDS,
    ) -> list[list[SampleResult]]:
        """Every prompt's samples, in prompt order."""
        requests = self._requests(request_id, prompts, params, group, fields)
        self._begin(request_id, requests)
        try:
            if len(requests) == 1:
                results = [await self.worker.generate(requests[0])]
            else:
                results = list(await asyncio.gather(*(self.worker.generate(r) for r in requests)))
        finally:
            self._end(request_id)
        for samples in results:
            for sample in samples:
                self._observe(
                    sample.spec, sample.finish_reason, sample.length_class, len(sample.token_ids)
                )
        return results

    async def stream(
        self,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        group: str | None,
        chunk: Chunk,
        tail: Tail | None,
        fields: Fields = OPENAI_FIELDS,
    ) -> AsyncIterator[str]:
        """Start the worker streams, wait for the first delta (so errors still get a status),
        then hand back the SSE iterator: chunk() per delta, tail() if given, [DONE]."""
        requests = self._requests(request_id, prompts, params, group, fields)
        self._begin(request_id, requests)
        merged = merge([self.worker.stream(r) for r in requests])
        try:
            first = await anext(merged)
        except BaseException:
            self._end(request_id)
            await merged.aclose()
            raise

        async def events() -> AsyncIterator[str]:
            finals: list[SampleDelta] = []
            lengths: dict[tuple[int, int], int] = {}
            produced = 0
            try:
                item: tuple[int, SampleDelta] | None = first
                while item is not None:
                    p, delta = item
                    produced += len(delta.token_ids)
                    key = (p, delta.index)
                    lengths[key] = lengths.get(key, 0) + len(delta.token_ids)
                    if delta.finish_reason is not None:
                        finals.append(delta)
                        self._observe(
                            delta.spec, delta.finish_reason, delta.length_class, lengths[key]
                        )
                    yield chunk(p, delta)
                    item = await anext(merged, None)
                if tail is not None:
                    yield tail(finals, produced)
                yield DONE
            except ServiceError as error:
                if status_of(error) == 500:
                    log.error("stream %s failed", request_id, exc_info=error)
                yield sse(error_response(error))
            except Exception:  # the status is sent: the error can only be an event
                log.exception("stream %s failed", request_id)
                yield sse(error_response(InternalError()))
            finally:
                self._end(request_id)
                await merged.aclose()

        stream = events()
        # A stream never iterated (its client left before the first chunk went out) runs no
        # finally: its admission ends when it is collected, unless it ended already.
        weakref.finalize(stream, self._end, request_id, self._samples[request_id])
        return stream

    async def abort(self, request_id: str | None) -> int:
        """Abort a request by the id its client knows (None: all); the number aborted."""
        if request_id is None:
            return await self.worker.abort(None)
        count = 0
        for worker_rid in self._active.get(request_id, [request_id]):
            count += await self.worker.abort(worker_rid)
        return count

    def _requests(
        self,
        request_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        group: str | None,
        fields: Fields,
    ) -> list[GenerateRequest]:
        if not prompts:
            raise InvalidRequest("no prompt given", fields.prompt)
        self.limits.check([len(p.token_ids) for p in prompts], params.max_tokens, fields)
        self.limits.check_sampling(params.n, params.stop, fields)
        for i, p in enumerate(prompts):
            if not p.request_id:
                p.request_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        try:
            return [GenerateRequest(p.request_id, p.token_ids, params, group) for p in prompts]
        except ValueError as error:  # GenerateRequest checks itself
            raise InvalidRequest(str(error)) from error

    def _begin(self, request_id: str, requests: list[GenerateRequest]) -> None:
        if request_id in self._active:
            raise InvalidRequest(f"request id {request_id!r} is already running", "rid")
        samples = sum(r.params.n for r in requests)
        self.limits.admit(samples, self.inflight_samples)
        self._active[request_id] = [r.request_id for r in requests]
        self._samples[request_id] = _Admitted(samples)
        self.inflight_samples += samples
        self._prompt_tokens.inc(sum(len(r.prompt_token_ids) for r in requests))

    def _end(self, request_id: str, admitted: _Admitted | None = None) -> None:
        """The request left the worker (admitted: only if it is still that admission)."""
        entry = self._samples.get(request_id)
        if entry is None or (admitted is not None and entry is not admitted):
            return
        del self._samples[request_id]
        self._active.pop(request_id, None)
        self.inflight_samples -= entry.samples

    def check_text(self, chars: int, param: str) -> None:
        """Refuse text too long for any prompt of this worker before it is tokenized."""
        self.limits.check_text(chars, param)

    def tokenize(self, texts: Sequence[str], param: str) -> list[list[int]]:
        """Text prompts as token ids, each refused first if it cannot fit (nor can more
        prompts than a request may hold)."""
        self.limits.check_count(len(texts), param)
        for text in texts:
            self.limits.check_text(len(text), param)
        return [self.worker.tokenize(text) for text in texts]

    def _observe(self, spec: SpecCounters, reason: str, klass: str, length: int) -> None:
        labels = {"worker": self.name, "length_class": klass}
        self._generated.labels(**labels).inc(length)
        self._lengths.labels(**labels).observe(length)
        self._forwards.labels(**labels).inc(spec.forward_passes)
        self._drafted.labels(**labels).inc(spec.drafted_tokens)
        self._accepted.labels(**labels).inc(spec.accepted_tokens)
        for source, tokens in spec.drafted_by_source.items():
            self._source_drafted.labels(worker=self.name, source=source).inc(tokens)
        for source, tokens in spec.accepted_by_source.items():
            self._source_accepted.labels(worker=self.name, source=source).inc(tokens)
        if spec.forward_passes:
            self._accept_rate.observe(spec.accepted_tokens / spec.forward_passes)
        self._finished.labels(worker=self.name, reason=reason).inc()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several async iterators as (source index, item), in arrival order."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T | None, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None, False))
        except Exception as error:  # handed to the consumer, which re-raises it
            await queue.put((index, None, error, True))
            return
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        await queue.put((index, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, got, error, finished = await queue.get()
            if error is not None:
                raise error
            if finished:
                remaining -= 1
            elif got is not None:
                yield index, got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
