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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag

TokenIds = list[int]

# -- request values ---------------------------------------------------------------------------
# Every request value is checked here, at the wire model, so that what reaches a dialect and
# the worker fits the types it is computed with: token ids travel as int32 (a bool is no token
# id), text encodes to UTF-8 (JSON may carry lone surrogates, "\ud800", which do not), counts
# and probabilities have their ranges. A value outside them is a 400 naming its field.

MAX_TOKEN_ID = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20

# Bounds a deployment sets (Settings: --max-n, --max-stop-strings, --max-stop-chars): the wire
# model bounds only the type, service.limits refuses a value above the configured one (a 400
# naming the field), and the OpenAPI schema carries the configured value: service.web fills
# in each value marked LIMIT_KEY (a Settings field's name) as the bound its type takes.
LIMIT_KEY = "x-das-limit"


def _configured(setting: str) -> dict[str, Any]:
    return {LIMIT_KEY: setting}


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"text must be valid Unicode: a lone surrogate at position {error.start}"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]
PromptIds = Annotated[list[TokenId], Field(min_length=1)]
StopText = Annotated[Text, Field(min_length=1, json_schema_extra=_configured("max_stop_chars"))]
Stop = (
    StopText | Annotated[list[StopText], Field(json_schema_extra=_configured("max_stop_strings"))]
)
StopTokenIds = Annotated[list[TokenId], Field(max_length=1024)]
Count = Annotated[int, Field(ge=1, le=MAX_TOKEN_ID, json_schema_extra=_configured("max_n"))]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKEN_ID)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=-1, le=MAX_TOKEN_ID)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


def _prompt_kind(value: Any) -> str:
    """Which form a prompt takes, from its first element: the one union member validated (a
    union tried member by member would check a million token ids several times over)."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, list) and value:
        if isinstance(value[0], str):
            return "list[str]"
        if isinstance(value[0], list):
            return "list[list[int]]"
    return "list[int]"


Texts = Annotated[list[Text], Field(min_length=1)]
PromptIdLists = Annotated[list[PromptIds], Field(min_length=1)]
# A prompt or a batch of them: text, texts, token ids, lists of token ids.
Prompts = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[Texts, Tag("list[str]")]
    | Annotated[PromptIds, Tag("list[int]")]
    | Annotated[PromptIdLists, Tag("list[list[int]]")],
    Discriminator(_prompt_kind),
]
TextPrompts = Annotated[
    Annotated[Text, Tag("str")] | Annotated[Texts, Tag("list[str]")], Discriminator(_prompt_kind)
]
IdPrompts = Annotated[
    Annotated[PromptIds, Tag("list[int]")] | Annotated[PromptIdLists, Tag("list[list[int]]")],
    Discriminator(_prompt_kind),
]


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
    model: Text | None = None
    n: Count = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    stop_token_ids: StopTokenIds | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # vLLM: choices carry token_ids, response prompt_token_ids
    prompt_group: Text | None = None  # extension: the prompt group (else X-Session-ID, else hash)
    # Accepted for compatibility; only their neutral values are honoured.
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    best_of: Count | None = None


class CompletionRequest(OpenAISamplingFields):
    prompt: Prompts
    max_tokens: MaxTokens | None = 16
    logprobs: TopLogprobs | None = None  # top-k alternatives to return; 0: the sampled token only
    echo: bool = False
    suffix: Text | None = None


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
    type: Text
    text: Text | None = None


class ChatMessage(_Request):
    role: Text
    content: Text | list[ContentPart] | None = None


class ChatCompletionRequest(OpenAISamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None


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
    max_new_tokens: MaxTokens | None = 128
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    stop: Stop | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: Seed | None = None
    n: Count = 1


class SGLangGenerateRequest(_Request):
    text: TextPrompts | None = None
    input_ids: IdPrompts | None = None
    sampling_params: SGLangSamplingParams = Field(default_factory=SGLangSamplingParams)
    return_logprob: bool = False
    top_logprobs_num: TopLogprobs = 0
    rid: Text | list[Text] | None = None
    stream: bool = False
    prompt_group: Text | None = None  # extension


class SGLangGenerateResponse(_Response):
    text: str
    output_ids: TokenIds
    meta_info: dict[str, Any]


# -- vLLM token-in / token-out ------------------------------------------------------------


class VLLMSamplingParams(_Request):
    n: Count = 1
    max_tokens: MaxTokens | None = 16
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = -1
    seed: Seed | None = None
    stop: Stop | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool = False
    logprobs: TopLogprobs | None = None  # None: none; k >= 0: sampled token plus k alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False


class VLLMGenerateRequest(_Request):
    request_id: Text | None = None
    model: Text | None = None
    token_ids: PromptIds
    sampling_params: VLLMSamplingParams = Field(default_factory=VLLMSamplingParams)
    stream: bool = False
    prompt_group: Text | None = None  # extension


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
    rid: Text | None = None
    abort_all: bool = False


class UpdateWeightsRequest(_Request):
    model_path: Text
    load_format: Text | None = None
    abort_all_requests: bool = False
    # The policy version the weights become (as SGLang's weight_version; a decimal string is
    # taken as its number); None: the worker's next. Never below the worker's current one.
    weight_version: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None


class UpdateWeightsResponse(_Response):
    success: bool
    message: str
    weight_version: str


class WeightVersionResponse(_Response):
    weight_version: str


class ControlResponse(_Response):
    success: bool = True
    message: str = ""
