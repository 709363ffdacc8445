"""Endpoint logic over a Worker: request -> SamplingParams -> worker -> wire response.

No FastAPI here: the routers in app.py call these methods and serialise what they return.
Every failure a client can cause is an APIError with its HTTP status; the worker's ValueError
and WorkerError become 400s. A streaming call returns an async iterator of SSE lines, and only
after its first event exists, so a request that cannot run still gets a proper error status.

Paused worker: generation requests wait (queued, as in SGLang's in-place pause) until
/continue_generation; /health_generate answers 503 while paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from service.metrics import Metrics
from service.protocol import (
    AbortRequest,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ControlResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SGLangGenerateRequest,
    SGLangGenerateResponse,
    SpecInfo,
    TopLogprob,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    UsageInfo,
    VLLMChoice,
    VLLMGenerateRequest,
    VLLMGenerateResponse,
    VLLMLogprobs,
    VLLMTokenLogprob,
    VLLMTopLogprob,
    WeightVersionResponse,
    _SamplingFields,
)
from service.worker import (
    GenerateRequest,
    SampleDelta,
    SampleResult,
    SamplingParams,
    SpecCounters,
    Worker,
    WorkerError,
)

DEFAULT_CHAT_MAX_TOKENS = 1024
DONE = "data: [DONE]\n\n"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}

T = TypeVar("T")


class APIError(Exception):
    """A failure with its HTTP status; the app renders it as an OpenAI-shaped ErrorResponse."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> ErrorResponse:
        return error_response(self.status, self.message, self.param)


def error_response(status: int, message: str, param: str | None = None) -> ErrorResponse:
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=kind, param=param, code=status))


def sse(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _spec(counters: SpecCounters) -> SpecInfo:
    return SpecInfo(
        forward_passes=counters.forward_passes,
        drafted_tokens=counters.drafted_tokens,
        accepted_tokens=counters.accepted_tokens,
    )


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as error:
        raise APIError(400, str(error)) from error


@dataclass(slots=True)
class _Prompt:
    token_ids: list[int]
    request_id: str  # the worker's request id


class Serving:
    """All endpoints of one worker process."""

    def __init__(self, worker: Worker, metrics: Metrics, worker_name: str) -> None:
        self.worker = worker
        self._name = worker_name
        self._active: dict[str, list[str]] = {}  # client request id -> worker request ids
        labels = {"worker": worker_name}
        self._prompt_tokens = metrics.prompt_tokens.labels(**labels)
        self._generated = metrics.generated_tokens.labels(**labels)
        self._forwards = metrics.forward_passes.labels(**labels)
        self._drafted = metrics.drafted_tokens.labels(**labels)
        self._accepted = metrics.accepted_tokens.labels(**labels)
        self._accept_rate = metrics.accepted_per_forward.labels(**labels)
        self._lengths = metrics.generation_length
        self._finished = metrics.finished
        metrics.running.labels(**labels).set_function(lambda: worker.load()[0])
        metrics.queued.labels(**labels).set_function(lambda: worker.load()[1])
        metrics.policy_version.labels(**labels).set_function(lambda: worker.weight_version)

    # -- OpenAI -------------------------------------------------------------------------

    def models(self) -> ModelList:
        name = self.worker.model_name
        return ModelList(data=[ModelCard(id=name, root=name)])

    async def completion(
        self, request: CompletionRequest, session_id: str | None = None, rid: str | None = None
    ) -> CompletionResponse | AsyncIterator[str]:
        self._check_model(request.model)
        if request.echo:
            raise APIError(400, "echo is not supported", "echo")
        if request.suffix is not None:
            raise APIError(400, "suffix is not supported", "suffix")
        prompts = self._completion_prompts(request.prompt)
        top = request.logprobs
        if top is not None and top < 0:
            raise APIError(400, "logprobs must be >= 0", "logprobs")
        params = self._sampling(
            request, max_tokens=request.max_tokens, logprobs=top is not None, top=top or 0
        )
        request_id = rid or f"cmpl-{uuid.uuid4().hex}"
        group = request.prompt_group or session_id
        if request.stream:
            return await self._completion_stream(request, request_id, prompts, params, group)
        results = await self._run_all(request_id, prompts, params, group)
        n = params.n
        choices: list[CompletionChoice] = []
        for p, (prompt, samples) in enumerate(zip(prompts, results, strict=True)):
            for sample in samples:
                choices.append(
                    CompletionChoice(
                        index=p * n + sample.index,
                        text=sample.text,
                        logprobs=self._completion_logprobs(
                            sample.token_ids, sample.logprobs, sample.top_logprobs, 0
                        )
                        if top is not None
                        else None,
                        finish_reason=sample.finish_reason,
                        stop_reason=sample.matched_stop,
                        token_ids=sample.token_ids if request.return_token_ids else None,
                        prompt_token_ids=prompt.token_ids if request.return_token_ids else None,
                        spec=_spec(sample.spec),
                    )
                )
        flat = [sample for samples in results for sample in samples]
        return CompletionResponse(
            id=request_id,
            model=self.worker.model_name,
            choices=choices,
            usage=self._usage(prompts, flat),
            prompt_token_ids=prompts[0].token_ids
            if request.return_token_ids and len(prompts) == 1
            else None,
            weight_version=str(flat[0].weight_version) if flat else None,
            spec=self._total_spec(flat),
        )

    async def _completion_stream(
        self,
        request: CompletionRequest,
        request_id: str,
        prompts: list[_Prompt],
        params: SamplingParams,
        group: str | None,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.worker.model_name
        offsets: dict[int, int] = {}
        usage = request.stream_options is not None and request.stream_options.include_usage

        def chunk(p: int, delta: SampleDelta) -> str:
            index = p * params.n + delta.index
            first = index not in offsets
            offset = offsets.get(index, 0)
            offsets[index] = offset + len(delta.text)
            done = delta.finish_reason is not None
            logprobs = None
            if params.logprobs:
                logprobs = self._completion_logprobs(
                    delta.token_ids, delta.logprobs, delta.top_logprobs, offset
                )
            choice = CompletionChoice(
                index=index,
                text=delta.text,
                logprobs=logprobs,
                finish_reason=delta.finish_reason,
                stop_reason=delta.matched_stop,
                token_ids=delta.token_ids if request.return_token_ids else None,
                prompt_token_ids=prompts[p].token_ids
                if request.return_token_ids and first
                else None,
                spec=_spec(delta.spec) if done else None,
            )
            return sse(
                CompletionChunk(id=request_id, created=created, model=model, choices=[choice])
            )

        def tail(finals: list[SampleDelta], completion_tokens: int) -> str:
            return sse(
                CompletionChunk(
                    id=request_id,
                    created=created,
                    model=model,
                    choices=[],
                    usage=self._stream_usage(prompts, completion_tokens),
                    spec=self._total_spec(finals),
                )
            )

        return await self._stream(
            request_id, prompts, params, group, chunk, tail if usage else None
        )

    async def chat(
        self, request: ChatCompletionRequest, session_id: str | None = None, rid: str | None = None
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self._check_model(request.model)
        if not request.messages:
            raise APIError(400, "messages must not be empty", "messages")
        try:
            prompt_ids = self.worker.apply_chat_template(_render_messages(request.messages))
        except (ValueError, KeyError) as error:
            raise APIError(400, f"cannot render messages: {error}", "messages") from error
        top = request.top_logprobs
        if top is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_tokens = request.max_completion_tokens or request.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        params = self._sampling(
            request, max_tokens=max_tokens, logprobs=request.logprobs, top=top or 0
        )
        request_id = rid or f"chatcmpl-{uuid.uuid4().hex}"
        group = request.prompt_group or session_id
        prompts = [_Prompt(prompt_ids, request_id)]
        if request.stream:
            return await self._chat_stream(request, request_id, prompts, params, group)
        (samples,) = await self._run_all(request_id, prompts, params, group)
        choices = [
            ChatChoice(
                index=sample.index,
                message=ChatResponseMessage(content=sample.text),
                logprobs=self._chat_logprobs(sample.token_ids, sample.logprobs, sample.top_logprobs)
                if params.logprobs
                else None,
                finish_reason=sample.finish_reason,
                stop_reason=sample.matched_stop,
                token_ids=sample.token_ids if request.return_token_ids else None,
                spec=_spec(sample.spec),
            )
            for sample in samples
        ]
        return ChatCompletionResponse(
            id=request_id,
            model=self.worker.model_name,
            choices=choices,
            usage=self._usage(prompts, samples),
            prompt_token_ids=prompt_ids if request.return_token_ids else None,
            weight_version=str(samples[0].weight_version) if samples else None,
            spec=self._total_spec(samples),
        )

    async def _chat_stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        prompts: list[_Prompt],
        params: SamplingParams,
        group: str | None,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        model = self.worker.model_name
        seen: set[int] = set()
        usage = request.stream_options is not None and request.stream_options.include_usage

        def chunk(_: int, delta: SampleDelta) -> str:
            lines = ""
            if delta.index not in seen:  # the role comes first, on its own
                seen.add(delta.index)
                role = ChatStreamChoice(index=delta.index, delta=ChatDelta(role="assistant"))
                lines = sse(
                    ChatCompletionChunk(id=request_id, created=created, model=model, choices=[role])
                )
            done = delta.finish_reason is not None
            choice = ChatStreamChoice(
                index=delta.index,
                delta=ChatDelta(content=delta.text),
                logprobs=self._chat_logprobs(delta.token_ids, delta.logprobs, delta.top_logprobs)
                if params.logprobs
                else None,
                finish_reason=delta.finish_reason,
                stop_reason=delta.matched_stop,
                token_ids=delta.token_ids if request.return_token_ids else None,
                spec=_spec(delta.spec) if done else None,
            )
            return lines + sse(
                ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
            )

        def tail(finals: list[SampleDelta], completion_tokens: int) -> str:
            return sse(
                ChatCompletionChunk(
                    id=request_id,
                    created=created,
                    model=model,
                    choices=[],
                    usage=self._stream_usage(prompts, completion_tokens),
                    spec=self._total_spec(finals),
                )
            )

        return await self._stream(
            request_id, prompts, params, group, chunk, tail if usage else None
        )

    # -- SGLang /generate ---------------------------------------------------------------

    async def sglang_generate(
        self, request: SGLangGenerateRequest, session_id: str | None = None
    ) -> SGLangGenerateResponse | list[SGLangGenerateResponse] | AsyncIterator[str]:
        if (request.text is None) == (request.input_ids is None):
            raise APIError(400, "exactly one of text and input_ids must be given", "input_ids")
        batch: list[list[int]]
        if request.input_ids is not None:
            ids = request.input_ids
            is_batch = bool(ids) and isinstance(ids[0], list)
            batch = [list(x) for x in ids] if is_batch else [list(ids)]  # type: ignore[arg-type]
        else:
            texts = request.text
            is_batch = isinstance(texts, list)
            batch = [
                self.worker.tokenize(t)
                for t in (texts if isinstance(texts, list) else [texts or ""])
            ]
        rids = self._sglang_rids(request.rid, len(batch), is_batch)
        sp = request.sampling_params
        if request.top_logprobs_num and not request.return_logprob:
            raise APIError(400, "top_logprobs_num needs return_logprob", "top_logprobs_num")
        params = _params(
            n=sp.n,
            max_tokens=128 if sp.max_new_tokens is None else sp.max_new_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            seed=sp.sampling_seed,
            stop=_stops(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids or ()),
            ignore_eos=sp.ignore_eos,
            logprobs=request.return_logprob,
            top_logprobs=request.top_logprobs_num,
            skip_special_tokens=sp.skip_special_tokens,
            no_stop_trim=sp.no_stop_trim,
        )
        prompts = [self._prompt(ids, rid) for ids, rid in zip(batch, rids, strict=True)]
        group = request.prompt_group or session_id
        client_id = rids[0] if len(rids) == 1 else f"batch-{uuid.uuid4().hex}"
        started = time.perf_counter()
        if request.stream:
            state: dict[int, tuple[list[int], list[str], list[list[Any]]]] = {}

            def chunk(p: int, delta: SampleDelta) -> str:
                index = p * params.n + delta.index
                ids, texts, logprobs = state.setdefault(index, ([], [], []))
                ids += delta.token_ids
                texts.append(delta.text)
                if delta.logprobs is not None:
                    logprobs += [
                        [lp, t, None] for lp, t in zip(delta.logprobs, delta.token_ids, strict=True)
                    ]
                meta = self._sglang_meta(
                    prompts[p],
                    rids[p],
                    delta,
                    len(ids),
                    logprobs if params.logprobs else None,
                    None,
                    started,
                    done=delta.finish_reason is not None,
                )
                payload: dict[str, Any] = {
                    "text": "".join(texts),
                    "output_ids": ids,
                    "meta_info": meta,
                }
                if is_batch or params.n > 1:
                    payload["index"] = index
                return sse(payload)

            return await self._stream(client_id, prompts, params, group, chunk, None)
        results = await self._run_all(client_id, prompts, params, group)
        outputs = [
            SGLangGenerateResponse(
                text=sample.text,
                output_ids=sample.token_ids,
                meta_info=self._sglang_meta(
                    prompt,
                    rid,
                    sample,
                    len(sample.token_ids),
                    [[lp, t, None] for lp, t in zip(sample.logprobs, sample.token_ids, strict=True)]
                    if sample.logprobs is not None
                    else None,
                    sample.top_logprobs,
                    started,
                    done=True,
                ),
            )
            for prompt, rid, samples in zip(prompts, rids, results, strict=True)
            for sample in samples
        ]
        if not is_batch and params.n == 1:
            return outputs[0]
        return outputs

    def _sglang_meta(
        self,
        prompt: _Prompt,
        rid: str,
        sample: SampleResult | SampleDelta,
        completion_tokens: int,
        logprobs: list[list[Any]] | None,
        top_logprobs: list[dict[int, float]] | None,
        started: float,
        done: bool,
    ) -> dict[str, Any]:
        spec = sample.spec
        finish: dict[str, Any] | None = None
        if done:
            if sample.finish_reason == "stop":
                finish = {"type": "stop", "matched": sample.matched_stop}
            elif sample.finish_reason == "length":
                finish = {"type": "length", "length": completion_tokens}
            else:
                finish = {"type": "abort", "message": "aborted"}
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": len(prompt.token_ids),
            "completion_tokens": completion_tokens,
            "cached_tokens": 0,
            "weight_version": str(sample.weight_version),
            "sampling_seed": sample.seed,
            "spec_verify_ct": spec.forward_passes,
            "spec_accept_length": completion_tokens / spec.forward_passes
            if spec.forward_passes
            else 0.0,
            "spec_draft_tokens": spec.drafted_tokens,
            "spec_accepted_tokens": spec.accepted_tokens,
            "e2e_latency": time.perf_counter() - started,
        }
        if logprobs is not None:
            meta["output_token_logprobs"] = logprobs
        if top_logprobs is not None:
            meta["output_top_logprobs"] = [
                [[lp, t, None] for t, lp in top.items()] for top in top_logprobs
            ]
        return meta

    @staticmethod
    def _sglang_rids(rid: str | list[str] | None, count: int, is_batch: bool) -> list[str]:
        if rid is None:
            return [uuid.uuid4().hex for _ in range(count)]
        if isinstance(rid, str):
            return [rid] if not is_batch else [f"{rid}-{i}" for i in range(count)]
        if len(rid) != count:
            raise APIError(400, f"rid has {len(rid)} ids for {count} prompts", "rid")
        return list(rid)

    # -- vLLM token-in / token-out ------------------------------------------------------

    async def vllm_generate(
        self, request: VLLMGenerateRequest, session_id: str | None = None
    ) -> VLLMGenerateResponse:
        self._check_model(request.model)
        if request.stream:
            raise APIError(400, "streaming is not supported on this endpoint", "stream")
        sp = request.sampling_params
        if sp.logprobs is not None and sp.logprobs < 0:
            raise APIError(400, "logprobs must be >= 0", "sampling_params.logprobs")
        params = _params(
            n=sp.n,
            max_tokens=16 if sp.max_tokens is None else sp.max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            seed=sp.seed,
            stop=_stops(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids or ()),
            ignore_eos=sp.ignore_eos,
            logprobs=sp.logprobs is not None,
            top_logprobs=sp.logprobs or 0,
            skip_special_tokens=sp.skip_special_tokens,
            no_stop_trim=sp.include_stop_str_in_output,
        )
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        prompts = [self._prompt(request.token_ids, request_id)]
        (samples,) = await self._run_all(
            request_id, prompts, params, request.prompt_group or session_id
        )
        choices = []
        for sample in samples:
            logprobs = None
            if sample.logprobs is not None:
                tops = sample.top_logprobs or [{} for _ in sample.token_ids]
                logprobs = VLLMLogprobs(
                    content=[
                        VLLMTokenLogprob(
                            token=f"token_id:{t}",
                            token_id=t,
                            logprob=lp,
                            top_logprobs=[
                                VLLMTopLogprob(token=f"token_id:{a}", token_id=a, logprob=alp)
                                for a, alp in top.items()
                            ],
                        )
                        for t, lp, top in zip(sample.token_ids, sample.logprobs, tops, strict=True)
                    ]
                )
            choices.append(
                VLLMChoice(
                    index=sample.index,
                    token_ids=sample.token_ids,
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.matched_stop,
                    logprobs=logprobs,
                    spec=_spec(sample.spec),
                )
            )
        return VLLMGenerateResponse(
            request_id=request_id,
            model=self.worker.model_name,
            choices=choices,
            prompt_token_ids=prompts[0].token_ids,
            usage=self._usage(prompts, samples),
            weight_version=str(
                samples[0].weight_version if samples else self.worker.weight_version
            ),
            spec=self._total_spec(samples),
        )

    # -- control ------------------------------------------------------------------------

    async def abort(self, request: AbortRequest) -> ControlResponse:
        if request.abort_all:
            count = await self.worker.abort(None)
            return ControlResponse(message=f"aborted {count} requests")
        if not request.rid:
            raise APIError(400, "give rid or abort_all", "rid")
        count = 0
        for worker_rid in self._active.get(request.rid, [request.rid]):
            count += await self.worker.abort(worker_rid)
        return ControlResponse(message=f"aborted {count} requests")

    async def pause(self) -> ControlResponse:
        await self.worker.pause()
        return ControlResponse(message="paused")

    async def resume(self) -> ControlResponse:
        await self.worker.resume()
        return ControlResponse(message="resumed")

    async def update_weights(self, request: UpdateWeightsRequest) -> UpdateWeightsResponse:
        if request.abort_all_requests:
            await self.worker.abort(None)
        try:
            version = await self.worker.update_weights(request.model_path)
        except (WorkerError, ValueError) as error:
            raise APIError(400, str(error), "model_path") from error
        return UpdateWeightsResponse(
            success=True, message=f"loaded {request.model_path}", weight_version=str(version)
        )

    def weight_version(self) -> WeightVersionResponse:
        return WeightVersionResponse(weight_version=str(self.worker.weight_version))

    async def flush_cache(self) -> ControlResponse:
        await self.worker.flush_cache()
        return ControlResponse(message="KV cache flushed (rollout history kept)")

    def health(self) -> dict[str, Any]:
        return self.worker.health()

    async def health_generate(self) -> dict[str, Any]:
        if self.worker.paused:
            raise APIError(503, "generation is paused")
        request = GenerateRequest(
            f"health-{uuid.uuid4().hex}", [1], SamplingParams(max_tokens=1), group="__health__"
        )
        try:
            await self.worker.generate(request)
        except (WorkerError, ValueError) as error:
            raise APIError(503, f"generation failed: {error}") from error
        return {"status": "ok"}

    def server_info(self) -> dict[str, Any]:
        info = dict(self.worker.server_info())
        info["worker"] = self._name
        return info

    # -- shared machinery ---------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.worker.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model")

    def _sampling(
        self, request: _SamplingFields, max_tokens: int | None, logprobs: bool, top: int
    ) -> SamplingParams:
        if request.presence_penalty or request.frequency_penalty:
            raise APIError(400, "presence and frequency penalties are not supported")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(400, "best_of must equal n", "best_of")
        return _params(
            n=request.n,
            max_tokens=16 if max_tokens is None else max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            seed=request.seed,
            stop=_stops(request.stop),
            stop_token_ids=tuple(request.stop_token_ids or ()),
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top,
            skip_special_tokens=request.skip_special_tokens,
            no_stop_trim=request.include_stop_str_in_output,
        )

    def _completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[_Prompt]:
        if isinstance(prompt, str):
            raw: list[list[int]] = [self.worker.tokenize(prompt)]
        elif not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        elif isinstance(prompt[0], str):
            raw = [self.worker.tokenize(p) for p in prompt]  # type: ignore[arg-type]
        elif isinstance(prompt[0], int):
            raw = [prompt]  # type: ignore[list-item]
        else:
            raw = [list(p) for p in prompt]  # type: ignore[arg-type]
        return [self._prompt(ids, "") for ids in raw]

    @staticmethod
    def _prompt(token_ids: list[int], request_id: str) -> _Prompt:
        if not token_ids:
            raise APIError(400, "prompt must not be empty", "prompt")
        return _Prompt(token_ids, request_id)

    def _requests(
        self, request_id: str, prompts: list[_Prompt], params: SamplingParams, group: str | None
    ) -> list[GenerateRequest]:
        for i, prompt in enumerate(prompts):
            if not prompt.request_id:
                prompt.request_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
        try:
            return [GenerateRequest(p.request_id, p.token_ids, params, group) for p in prompts]
        except ValueError as error:
            raise APIError(400, str(error)) from error

    async def _run_all(
        self, request_id: str, prompts: list[_Prompt], params: SamplingParams, group: str | None
    ) -> list[list[SampleResult]]:
        requests = self._requests(request_id, prompts, params, group)
        self._begin(request_id, requests)
        try:
            if len(requests) == 1:
                results = [await self.worker.generate(requests[0])]
            else:
                results = list(await asyncio.gather(*(self.worker.generate(r) for r in requests)))
        except (WorkerError, ValueError) as error:
            raise APIError(400, str(error)) from error
        finally:
            self._active.pop(request_id, None)
        for samples in results:
            for sample in samples:
                self._observe(
                    sample.token_ids, sample.spec, sample.finish_reason, sample.length_class
                )
        return results

    async def _stream(
        self,
        request_id: str,
        prompts: list[_Prompt],
        params: SamplingParams,
        group: str | None,
        chunk: Any,
        tail: Any,
    ) -> AsyncIterator[str]:
        """Start the worker streams, wait for the first delta (so errors still get a status),
        then hand back the SSE iterator."""
        requests = self._requests(request_id, prompts, params, group)
        self._begin(request_id, requests)
        merged = _merge([self.worker.stream(r) for r in requests])
        try:
            first = await anext(merged)
        except (WorkerError, ValueError) as error:
            self._active.pop(request_id, None)
            await merged.aclose()
            raise APIError(400, str(error)) from error
        except BaseException:
            self._active.pop(request_id, None)
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
                        self._observe_counts(
                            delta.spec, delta.finish_reason, delta.length_class, lengths[key]
                        )
                    yield chunk(p, delta)
                    item = await anext(merged, None)
                if tail is not None:
                    yield tail(finals, produced)
                yield DONE
            except (WorkerError, ValueError) as error:
                yield sse(error_response(500, f"generation failed: {error}"))
            finally:
                self._active.pop(request_id, None)
                await merged.aclose()

        return events()

    def _begin(self, request_id: str, requests: list[GenerateRequest]) -> None:
        if request_id in self._active:
            raise APIError(400, f"request id {request_id!r} is already running", "rid")
        self._active[request_id] = [r.request_id for r in requests]
        self._prompt_tokens.inc(sum(len(r.prompt_token_ids) for r in requests))

    def _observe(
        self, token_ids: Sequence[int], spec: SpecCounters, reason: str, klass: str
    ) -> None:
        self._observe_counts(spec, reason, klass, len(token_ids))

    def _observe_counts(self, spec: SpecCounters, reason: str, klass: str, length: int) -> None:
        self._generated.inc(length)
        self._lengths.labels(worker=self._name, length_class=klass).observe(length)
        self._forwards.inc(spec.forward_passes)
        self._drafted.inc(spec.drafted_tokens)
        self._accepted.inc(spec.accepted_tokens)
        if spec.forward_passes:
            self._accept_rate.observe(spec.accepted_tokens / spec.forward_passes)
        self._finished.labels(worker=self._name, reason=reason).inc()

    @staticmethod
    def _usage(prompts: list[_Prompt], samples: Sequence[SampleResult]) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        completion_tokens = sum(len(s.token_ids) for s in samples)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    @staticmethod
    def _stream_usage(prompts: list[_Prompt], completion_tokens: int) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    @staticmethod
    def _total_spec(samples: Sequence[SampleResult | SampleDelta]) -> SpecInfo:
        total = SpecCounters()
        for sample in samples:
            total.add(sample.spec)
        return _spec(total)

    def _completion_logprobs(
        self,
        token_ids: list[int],
        logprobs: list[float] | None,
        tops: list[dict[int, float]] | None,
        offset: int,
    ) -> CompletionLogprobs:
        tokens = [self.worker.detokenize([t], skip_special_tokens=False) for t in token_ids]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=logprobs or [],
            top_logprobs=[
                {self.worker.detokenize([t], False): lp for t, lp in top.items()} for top in tops
            ]
            if tops is not None
            else None,
            text_offset=offsets,
        )

    def _chat_logprobs(
        self,
        token_ids: list[int],
        logprobs: list[float] | None,
        tops: list[dict[int, float]] | None,
    ) -> ChatLogprobs:
        content = []
        for i, (token, logprob) in enumerate(zip(token_ids, logprobs or [], strict=False)):
            text = self.worker.detokenize([token], skip_special_tokens=False)
            alternatives = []
            if tops is not None:
                for alt, alt_lp in tops[i].items():
                    alt_text = self.worker.detokenize([alt], skip_special_tokens=False)
                    alternatives.append(
                        TopLogprob(token=alt_text, logprob=alt_lp, bytes=list(alt_text.encode()))
                    )
            content.append(
                ChatTokenLogprob(
                    token=text,
                    logprob=logprob,
                    bytes=list(text.encode()),
                    top_logprobs=alternatives,
                )
            )
        return ChatLogprobs(content=content)


def _render_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    rendered = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        rendered.append({"role": message.role, "content": content or ""})
    return rendered


async def _merge(streams: list[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
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
