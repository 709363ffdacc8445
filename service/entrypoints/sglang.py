"""SGLang's native POST /generate (slime's rollout call): input_ids or text, one prompt or a
batch, sampling_params, return_logprob, rid. meta_info carries SGLang's fields plus the spec
counters (spec_verify_ct, spec_accept_length, spec_draft_tokens, spec_accepted_tokens);
streams send the output so far (cumulative), as SGLang does."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from service.entrypoints.deps import GenerationDep, SessionHeader
from service.entrypoints.generation import Generation, Prompt, sse, stops, to_prompt
from service.errors import InvalidRequest
from service.limits import Fields
from service.protocol import SGLangGenerateRequest, SGLangGenerateResponse
from service.web import respond
from service.worker import SampleDelta, SampleResult, SamplingParams


def sampling_params(request: SGLangGenerateRequest) -> SamplingParams:
    if request.top_logprobs_num and not request.return_logprob:
        raise InvalidRequest("top_logprobs_num needs return_logprob", "top_logprobs_num")
    sp = request.sampling_params
    try:
        return SamplingParams(
            n=sp.n,
            max_tokens=128 if sp.max_new_tokens is None else sp.max_new_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            seed=sp.sampling_seed,
            stop=stops(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids or ()),
            ignore_eos=sp.ignore_eos,
            logprobs=request.return_logprob,
            top_logprobs=request.top_logprobs_num,
            skip_special_tokens=sp.skip_special_tokens,
            no_stop_trim=sp.no_stop_trim,
        )
    except ValueError as error:  # SamplingParams checks itself
        raise InvalidRequest(str(error)) from error


async def generate(
    generation: Generation, request: SGLangGenerateRequest, session_id: str | None = None
) -> SGLangGenerateResponse | list[SGLangGenerateResponse] | AsyncIterator[str]:
    """One response for one prompt and n = 1, else a list (prompt-major); or a stream."""
    if (request.text is None) == (request.input_ids is None):
        raise InvalidRequest("exactly one of text and input_ids must be given", "input_ids")
    batch: list[list[int]]
    if request.input_ids is not None:
        ids = request.input_ids
        is_batch = bool(ids) and isinstance(ids[0], list)
        batch = [list(x) for x in ids] if is_batch else [list(ids)]  # type: ignore[arg-type]
    else:
        texts = request.text
        is_batch = isinstance(texts, list)
        batch = generation.tokenize(texts if isinstance(texts, list) else [texts or ""], "text")
    rids = _rids(request.rid, len(batch), is_batch)
    params = sampling_params(request)
    prompts = [to_prompt(ids, rid) for ids, rid in zip(batch, rids, strict=True)]
    group = request.prompt_group or session_id
    client_id = rids[0] if len(rids) == 1 else f"batch-{uuid.uuid4().hex}"
    started = time.perf_counter()
    if request.stream:
        fields = _fields(request)
        return await _stream(generation, client_id, prompts, rids, params, group, is_batch, fields)
    results = await generation.run_all(client_id, prompts, params, group, _fields(request))
    outputs = [
        SGLangGenerateResponse(
            text=sample.text,
            output_ids=sample.token_ids,
            meta_info=_meta(
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


async def _stream(
    generation: Generation,
    client_id: str,
    prompts: list[Prompt],
    rids: list[str],
    params: SamplingParams,
    group: str | None,
    is_batch: bool,
    fields: Fields,
) -> AsyncIterator[str]:
    started = time.perf_counter()
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
        meta = _meta(
            prompts[p],
            rids[p],
            delta,
            len(ids),
            logprobs if params.logprobs else None,
            None,
            started,
            done=delta.finish_reason is not None,
        )
        payload: dict[str, Any] = {"text": "".join(texts), "output_ids": ids, "meta_info": meta}
        if is_batch or params.n > 1:
            payload["index"] = index
        return sse(payload)

    return await generation.stream(client_id, prompts, params, group, chunk, None, fields)


def _fields(request: SGLangGenerateRequest) -> Fields:
    prompt = "input_ids" if request.input_ids is not None else "text"
    return Fields(
        prompt, "sampling_params.max_new_tokens", "sampling_params.n", "sampling_params.stop"
    )


def _meta(
    prompt: Prompt,
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


def _rids(rid: str | list[str] | None, count: int, is_batch: bool) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if isinstance(rid, str):
        return [rid] if not is_batch else [f"{rid}-{i}" for i in range(count)]
    if len(rid) != count:
        raise InvalidRequest(f"rid has {len(rid)} ids for {count} prompts", "rid")
    return list(rid)


router = APIRouter()  # API keys: service.web.ApiKeys


@router.post("/generate")
async def sglang_generate(
    body: SGLangGenerateRequest, generation: GenerationDep, session: SessionHeader = None
) -> Response:
    return respond(await generate(generation, body, session))
