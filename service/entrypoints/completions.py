"""OpenAI POST /v1/completions, with vLLM's extensions (return_token_ids, stop_token_ids,
top_k, ...). Also the one mapping of the OpenAI sampling fields to SamplingParams, which the
chat dialect shares."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import Response

from service.entrypoints.deps import GenerationDep, RequestIdHeader, SessionHeader
from service.entrypoints.generation import (
    Generation,
    Prompt,
    output_tokens,
    spec_info,
    sse,
    stops,
    to_prompt,
    total_spec,
    usage,
)
from service.errors import InvalidRequest
from service.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    OpenAISamplingFields,
)
from service.web import respond
from service.worker import SampleDelta, SamplingParams, Worker


def sampling_params(
    request: OpenAISamplingFields, *, max_tokens: int | None, logprobs: bool, top_logprobs: int
) -> SamplingParams:
    """An OpenAI request's SamplingParams (completions and chat); the fields whose meaning
    differs between the two come resolved by the caller."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise InvalidRequest(f"{name} is not supported (only 0)", name)
    if request.best_of is not None and request.best_of != request.n:
        raise InvalidRequest("best_of must equal n", "best_of")
    try:
        return SamplingParams(
            n=request.n,
            max_tokens=16 if max_tokens is None else max_tokens,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=-1 if request.top_k is None else request.top_k,
            seed=request.seed,
            stop=stops(request.stop),
            stop_token_ids=tuple(request.stop_token_ids or ()),
            ignore_eos=request.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            no_stop_trim=request.include_stop_str_in_output,
        )
    except ValueError as error:  # SamplingParams checks itself
        raise InvalidRequest(str(error)) from error


async def complete(
    generation: Generation,
    request: CompletionRequest,
    session_id: str | None = None,
    rid: str | None = None,
) -> CompletionResponse | AsyncIterator[str]:
    generation.check_model(request.model)
    if request.echo:
        raise InvalidRequest("echo is not supported", "echo")
    if request.suffix is not None:
        raise InvalidRequest("suffix is not supported", "suffix")
    prompts = _prompts(generation, request.prompt)
    top = request.logprobs
    if top is not None and top < 0:
        raise InvalidRequest("logprobs must be >= 0", "logprobs")
    params = sampling_params(
        request, max_tokens=request.max_tokens, logprobs=top is not None, top_logprobs=top or 0
    )
    request_id = rid or f"cmpl-{uuid.uuid4().hex}"
    group = request.prompt_group or session_id
    if request.stream:
        return await _stream(generation, request, request_id, prompts, params, group)
    results = await generation.run_all(request_id, prompts, params, group)
    worker = generation.worker
    choices: list[CompletionChoice] = []
    for p, (prompt, samples) in enumerate(zip(prompts, results, strict=True)):
        for sample in samples:
            choices.append(
                CompletionChoice(
                    index=p * params.n + sample.index,
                    text=sample.text,
                    logprobs=_logprobs(
                        worker, sample.token_ids, sample.logprobs, sample.top_logprobs, 0
                    )
                    if top is not None
                    else None,
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.matched_stop,
                    token_ids=sample.token_ids if request.return_token_ids else None,
                    prompt_token_ids=prompt.token_ids if request.return_token_ids else None,
                    spec=spec_info(sample.spec),
                )
            )
    flat = [sample for samples in results for sample in samples]
    return CompletionResponse(
        id=request_id,
        model=generation.model_name,
        choices=choices,
        usage=usage(prompts, output_tokens(flat)),
        prompt_token_ids=prompts[0].token_ids
        if request.return_token_ids and len(prompts) == 1
        else None,
        weight_version=str(flat[0].weight_version) if flat else None,
        spec=total_spec(flat),
    )


async def _stream(
    generation: Generation,
    request: CompletionRequest,
    request_id: str,
    prompts: list[Prompt],
    params: SamplingParams,
    group: str | None,
) -> AsyncIterator[str]:
    created = int(time.time())
    model = generation.model_name
    worker = generation.worker
    offsets: dict[int, int] = {}
    with_usage = request.stream_options is not None and request.stream_options.include_usage

    def chunk(p: int, delta: SampleDelta) -> str:
        index = p * params.n + delta.index
        first = index not in offsets
        offset = offsets.get(index, 0)
        offsets[index] = offset + len(delta.text)
        done = delta.finish_reason is not None
        logprobs = None
        if params.logprobs:
            logprobs = _logprobs(
                worker, delta.token_ids, delta.logprobs, delta.top_logprobs, offset
            )
        choice = CompletionChoice(
            index=index,
            text=delta.text,
            logprobs=logprobs,
            finish_reason=delta.finish_reason,
            stop_reason=delta.matched_stop,
            token_ids=delta.token_ids if request.return_token_ids else None,
            prompt_token_ids=prompts[p].token_ids if request.return_token_ids and first else None,
            spec=spec_info(delta.spec) if done else None,
        )
        return sse(CompletionChunk(id=request_id, created=created, model=model, choices=[choice]))

    def tail(finals: list[SampleDelta], completion_tokens: int) -> str:
        return sse(
            CompletionChunk(
                id=request_id,
                created=created,
                model=model,
                choices=[],
                usage=usage(prompts, completion_tokens),
                spec=total_spec(finals),
            )
        )

    return await generation.stream(
        request_id, prompts, params, group, chunk, tail if with_usage else None
    )


def _prompts(
    generation: Generation, raw: str | list[str] | list[int] | list[list[int]]
) -> list[Prompt]:
    if isinstance(raw, str):
        ids: list[list[int]] = generation.tokenize([raw], "prompt")
    elif not raw:
        raise InvalidRequest("prompt must not be empty", "prompt")
    elif isinstance(raw[0], str):
        ids = generation.tokenize(raw, "prompt")  # type: ignore[arg-type]
    elif isinstance(raw[0], int):
        ids = [raw]  # type: ignore[list-item]
    else:
        ids = [list(p) for p in raw]  # type: ignore[arg-type]
    return [to_prompt(token_ids) for token_ids in ids]


def _logprobs(
    worker: Worker,
    token_ids: list[int],
    logprobs: list[float] | None,
    tops: list[dict[int, float]] | None,
    offset: int,
) -> CompletionLogprobs:
    tokens = [worker.detokenize([t], skip_special_tokens=False) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=logprobs or [],
        top_logprobs=[{worker.detokenize([t], False): lp for t, lp in top.items()} for top in tops]
        if tops is not None
        else None,
        text_offset=offsets,
    )


router = APIRouter()  # API keys: service.web.ApiKeys


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    generation: GenerationDep,
    session: SessionHeader = None,
    rid: RequestIdHeader = None,
) -> Response:
    return respond(await complete(generation, body, session, rid))
