"""vLLM's token-in/token-out POST /inference/v1/generate (SkyRL, prime-rl): prompt token ids
in, output token ids and their logprobs out, no text. Not streamed."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from fastapi.responses import Response

from service.entrypoints.deps import GenerationDep, SessionHeader
from service.entrypoints.generation import (
    Generation,
    output_tokens,
    spec_info,
    stops,
    to_prompt,
    total_spec,
    usage,
)
from service.errors import InvalidRequest
from service.limits import Fields
from service.protocol import (
    VLLMChoice,
    VLLMGenerateRequest,
    VLLMGenerateResponse,
    VLLMLogprobs,
    VLLMTokenLogprob,
    VLLMTopLogprob,
)
from service.web import json_response
from service.worker import SampleResult, SamplingParams


def sampling_params(request: VLLMGenerateRequest) -> SamplingParams:
    sp = request.sampling_params
    if sp.logprobs is not None and sp.logprobs < 0:
        raise InvalidRequest("logprobs must be >= 0", "sampling_params.logprobs")
    try:
        return SamplingParams(
            n=sp.n,
            max_tokens=16 if sp.max_tokens is None else sp.max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            seed=sp.seed,
            stop=stops(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids or ()),
            ignore_eos=sp.ignore_eos,
            logprobs=sp.logprobs is not None,
            top_logprobs=sp.logprobs or 0,
            skip_special_tokens=sp.skip_special_tokens,
            no_stop_trim=sp.include_stop_str_in_output,
        )
    except ValueError as error:  # SamplingParams checks itself
        raise InvalidRequest(str(error)) from error


async def generate(
    generation: Generation, request: VLLMGenerateRequest, session_id: str | None = None
) -> VLLMGenerateResponse:
    generation.check_model(request.model)
    if request.stream:
        raise InvalidRequest("streaming is not supported on this endpoint", "stream")
    params = sampling_params(request)
    request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
    prompts = [to_prompt(request.token_ids, request_id)]
    group = request.prompt_group or session_id
    fields = Fields(
        "token_ids", "sampling_params.max_tokens", "sampling_params.n", "sampling_params.stop"
    )
    (samples,) = await generation.run_all(request_id, prompts, params, group, fields)
    return VLLMGenerateResponse(
        request_id=request_id,
        model=generation.model_name,
        choices=[
            VLLMChoice(
                index=sample.index,
                token_ids=sample.token_ids,
                finish_reason=sample.finish_reason,
                stop_reason=sample.matched_stop,
                logprobs=_logprobs(sample),
                spec=spec_info(sample.spec),
            )
            for sample in samples
        ],
        prompt_token_ids=prompts[0].token_ids,
        usage=usage(prompts, output_tokens(samples)),
        weight_version=str(
            samples[0].weight_version if samples else generation.worker.weight_version
        ),
        spec=total_spec(samples),
    )


def _logprobs(sample: SampleResult) -> VLLMLogprobs | None:
    if sample.logprobs is None:
        return None
    tops = sample.top_logprobs or [{} for _ in sample.token_ids]
    return VLLMLogprobs(
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


router = APIRouter()  # API keys: service.web.ApiKeys


@router.post("/inference/v1/generate")
async def vllm_generate(
    body: VLLMGenerateRequest, generation: GenerationDep, session: SessionHeader = None
) -> Response:
    return json_response(await generate(generation, body, session))
