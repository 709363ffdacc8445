"""Wire models: OpenAI completions and chat (with vLLM's extensions), SGLang's native /generate,
vLLM's token-in/token-out /inference/v1/generate, the control endpoints, and ErrorResponse.

Requests ignore unknown fields (trainers send many engine-specific knobs); values the service
cannot honour are rejected by their dialect (service.entrypoints) with a 400. Extensions on
every generation response:
- `spec` (OpenAI and vLLM shapes): this request's speculation counters, SpecInfo; per choice
  and summed over choices. SGLang's meta_info carries spec_verify_ct (forward passes),
  spec_accept_length (output tokens per forward pass), spec_draft_tokens, spec_accepted_tokens.
- `prompt_group` request field (or the X-Session-ID header) names the prompt group.
- `weight_version`: the policy version that produced the output.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TokenIds = list[int]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors -------------------------------------------------------------------------------


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: int  # the HTTP status


class ErrorResponse(_Response):
    error: ErrorInfo


# -- shared -------------------------------------------------------------------------------


class SpecInfo(_Response):
    forward_passes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(_Request):
    include_usage: bool = False


# -- OpenAI completions -------------------------------------------------------------------


class OpenAISamplingFields(_Request):
    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # vLLM: choices carry token_ids, response prompt_token_ids
    prompt_group: str | None = None  # extension: the prompt group (else X-Session-ID, else hash)
    # Accepted for compatibility; only their neutral values are honoured.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    best_of: int | None = None


class CompletionRequest(OpenAISamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = None  # top-k alternatives to return; 0: the sampled token only
    echo: bool = False
    suffix: str | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the matched stop token id or string
    token_ids: TokenIds | None = None
    prompt_token_ids: TokenIds | None = None
    spec: SpecInfo | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: TokenIds | None = None  # single prompt with return_token_ids
    weight_version: str | None = None
    spec: SpecInfo | None = None


# -- OpenAI chat --------------------------------------------------------------------------


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(OpenAISamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: TokenIds | None = None
    spec: SpecInfo | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: TokenIds | None = None
    weight_version: str | None = None
    spec: SpecInfo | None = None


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: TokenIds | None = None
    spec: SpecInfo | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    spec: SpecInfo | None = None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    spec: SpecInfo | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "das"
    root: str | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- SGLang /generate ---------------------------------------------------------------------


class SGLangSamplingParams(_Request):
    max_new_tokens: int | None = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    n: int = 1


class SGLangGenerateRequest(_Request):
    text: str | list[str] | None = None
    input_ids: TokenIds | list[TokenIds] | None = None
    sampling_params: SGLangSamplingParams = Field(default_factory=SGLangSamplingParams)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    rid: str | list[str] | None = None
    stream: bool = False
    prompt_group: str | None = None  # extension


class SGLangGenerateResponse(_Response):
    text: str
    output_ids: TokenIds
    meta_info: dict[str, Any]


# -- vLLM token-in / token-out ------------------------------------------------------------


class VLLMSamplingParams(_Request):
    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: sampled token plus k alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class VLLMGenerateRequest(_Request):
    request_id: str | None = None
    model: str | None = None
    token_ids: TokenIds
    sampling_params: VLLMSamplingParams = Field(default_factory=VLLMSamplingParams)
    stream: bool = False
    prompt_group: str | None = None  # extension


class VLLMTopLogprob(_Response):
    token: str
    token_id: int
    logprob: float


class VLLMTokenLogprob(_Response):
    token: str  # "token_id:<id>" as vLLM writes it for token-id output
    token_id: int
    logprob: float
    top_logprobs: list[VLLMTopLogprob] = Field(default_factory=list)


class VLLMLogprobs(_Response):
    content: list[VLLMTokenLogprob]


class VLLMChoice(_Response):
    index: int
    token_ids: TokenIds
    finish_reason: str
    stop_reason: int | str | None = None
    logprobs: VLLMLogprobs | None = None
    spec: SpecInfo | None = None


class VLLMGenerateResponse(_Response):
    request_id: str
    model: str
    choices: list[VLLMChoice]
    prompt_token_ids: TokenIds
    usage: UsageInfo
    weight_version: str
    spec: SpecInfo


# -- control ------------------------------------------------------------------------------


class AbortRequest(_Request):
    rid: str | None = None
    abort_all: bool = False


class UpdateWeightsRequest(_Request):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False


class UpdateWeightsResponse(_Response):
    success: bool
    message: str
    weight_version: str


class WeightVersionResponse(_Response):
    weight_version: str


class ControlResponse(_Response):
    success: bool = True
    message: str = ""
