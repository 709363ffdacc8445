"""OpenAI POST /v1/chat/completions: the messages rendered with the worker's chat template,
then sampled as a completion of one prompt (the sampling fields are those of completions)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import Response

from service.entrypoints.completions import sampling_params
from service.entrypoints.deps import GenerationDep, RequestIdHeader, SessionHeader
from service.entrypoints.generation import (
    Generation,
    Prompt,
    output_tokens,
    spec_info,
    sse,
    total_spec,
    usage,
)
from service.errors import InvalidRequest
from service.limits import Fields
from service.protocol import (
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
    TopLogprob,
)
from service.web import respond
from service.worker import SampleDelta, SamplingParams, Worker

DEFAULT_MAX_TOKENS = 1024


async def chat(
    generation: Generation,
    request: ChatCompletionRequest,
    session_id: str | None = None,
    rid: str | None = None,
) -> ChatCompletionResponse | AsyncIterator[str]:
    generation.check_model(request.model)
    if not request.messages:
        raise InvalidRequest("messages must not be empty", "messages")
    worker = generation.worker
    messages = _render(request.messages)
    generation.check_text(sum(len(m["content"]) + len(m["role"]) for m in messages), "messages")
    try:
        prompt_ids = worker.apply_chat_template(messages)
    except (ValueError, KeyError) as error:  # the template refused these messages
        raise InvalidRequest(f"cannot render messages: {error}", "messages") from error
    top = request.top_logprobs
    if top is not None and not request.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = next(
        (m for m in (request.max_completion_tokens, request.max_tokens) if m is not None),
        DEFAULT_MAX_TOKENS,
    )
    params = sampling_params(
        request, max_tokens=max_tokens, logprobs=request.logprobs, top_logprobs=top or 0
    )
    request_id = rid or f"chatcmpl-{uuid.uuid4().hex}"
    group = request.prompt_group or session_id
    prompts = [Prompt(prompt_ids, request_id)]
    if request.stream:
        return await _stream(generation, request, request_id, prompts, params, group)
    (samples,) = await generation.run_all(request_id, prompts, params, group, _fields(request))
    choices = [
        ChatChoice(
            index=sample.index,
            message=ChatResponseMessage(content=sample.text),
            logprobs=_logprobs(worker, sample.token_ids, sample.logprobs, sample.top_logprobs)
            if params.logprobs
            else None,
            finish_reason=sample.finish_reason,
            stop_reason=sample.matched_stop,
            token_ids=sample.token_ids if request.return_token_ids else None,
            spec=spec_info(sample.spec),
        )
        for sample in samples
    ]
    return ChatCompletionResponse(
        id=request_id,
        model=generation.model_name,
        choices=choices,
        usage=usage(prompts, output_tokens(samples)),
        prompt_token_ids=prompt_ids if request.return_token_ids else None,
        weight_version=str(samples[0].weight_version) if samples else None,
        spec=total_spec(samples),
    )


async def _stream(
    generation: Generation,
    request: ChatCompletionRequest,
    request_id: str,
    prompts: list[Prompt],
    params: SamplingParams,
    group: str | None,
) -> AsyncIterator[str]:
    created = int(time.time())
    model = generation.model_name
    worker = generation.worker
    seen: set[int] = set()
    with_usage = request.stream_options is not None and request.stream_options.include_usage

    def event(choice: ChatStreamChoice) -> str:
        return sse(
            ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
        )

    def chunk(_: int, delta: SampleDelta) -> str:
        lines = ""
        if delta.index not in seen:  # the role comes first, on its own
            seen.add(delta.index)
            lines = event(ChatStreamChoice(index=delta.index, delta=ChatDelta(role="assistant")))
        done = delta.finish_reason is not None
        return lines + event(
            ChatStreamChoice(
                index=delta.index,
                delta=ChatDelta(content=delta.text),
                logprobs=_logprobs(worker, delta.token_ids, delta.logprobs, delta.top_logprobs)
                if params.logprobs
                else None,
                finish_reason=delta.finish_reason,
                stop_reason=delta.matched_stop,
                token_ids=delta.token_ids if request.return_token_ids else None,
                spec=spec_info(delta.spec) if done else None,
            )
        )

    def tail(finals: list[SampleDelta], completion_tokens: int) -> str:
        return sse(
            ChatCompletionChunk(
                id=request_id,
                created=created,
                model=model,
                choices=[],
                usage=usage(prompts, completion_tokens),
                spec=total_spec(finals),
            )
        )

    return await generation.stream(
        request_id, prompts, params, group, chunk, tail if with_usage else None, _fields(request)
    )


def _fields(request: ChatCompletionRequest) -> Fields:
    tokens = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    return Fields("messages", tokens)


def _render(messages: list[ChatMessage]) -> list[dict[str, str]]:
    rendered = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InvalidRequest(
                    "cannot render messages: only text content parts are supported", "messages"
                )
            content = "".join(part.text or "" for part in content)
        rendered.append({"role": message.role, "content": content or ""})
    return rendered


def _logprobs(
    worker: Worker,
    token_ids: list[int],
    logprobs: list[float] | None,
    tops: list[dict[int, float]] | None,
) -> ChatLogprobs:
    content = []
    for i, (token, logprob) in enumerate(zip(token_ids, logprobs or [], strict=False)):
        text = worker.detokenize([token], skip_special_tokens=False)
        alternatives = []
        if tops is not None:
            for alt, alt_lp in tops[i].items():
                alt_text = worker.detokenize([alt], skip_special_tokens=False)
                alternatives.append(
                    TopLogprob(token=alt_text, logprob=alt_lp, bytes=list(alt_text.encode()))
                )
        content.append(
            ChatTokenLogprob(
                token=text, logprob=logprob, bytes=list(text.encode()), top_logprobs=alternatives
            )
        )
    return ChatLogprobs(content=content)


router = APIRouter()  # API keys: service.web.ApiKeys


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    generation: GenerationDep,
    session: SessionHeader = None,
    rid: RequestIdHeader = None,
) -> Response:
    return respond(await chat(generation, body, session, rid))
