"""What one request may ask of a worker: the checks Generation runs before any work starts.

The wire models (service.protocol) bound each value on its own; these bounds depend on the
worker and the deployment (Settings): the context (prompt + max_tokens of one sequence, 400
as vLLM answers) and the prompts in one request. `Fields` names the request fields a dialect
calls the prompt and max_tokens, so a refusal's `param` is the field the client sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.errors import InvalidRequest, Overloaded

FAKE_MAX_MODEL_LEN = 1 << 15  # the FakeWorker's context: it has no model to take one from
# Text longer than this many characters per token of context cannot fit whatever the
# tokenizer (a token of more is a pathological run): refused before tokenizing, which for
# megabytes of text would hold the worker's event loop for seconds.
MAX_CHARS_PER_TOKEN = 64


@dataclass(frozen=True, slots=True)
class Fields:
    """A dialect's names for the prompt and max_tokens."""

    prompt: str = "prompt"
    max_tokens: str = "max_tokens"


OPENAI_FIELDS = Fields()


@dataclass(frozen=True, slots=True)
class Limits:
    max_model_len: int  # prompt + output tokens of one sequence
    max_prompts: int = 256  # prompts in one request
    max_inflight_samples: int = 4096  # samples running or queued on the worker at once
    retry_after_s: int = 1  # what a refused client is told to wait

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if self.max_inflight_samples < 1:
            raise ValueError(f"max_inflight_samples must be >= 1, got {self.max_inflight_samples}")

    def check_text(self, chars: int, param: str) -> None:
        limit = self.max_model_len * MAX_CHARS_PER_TOKEN
        if chars > limit:
            raise InvalidRequest(
                f"the prompt has {chars} characters: more than this model's context of "
                f"{self.max_model_len} tokens can hold (at most {limit})",
                param,
            )

    def admit(self, samples: int, inflight: int) -> None:
        """Admission control: a request whose samples never fit is the client's error (400);
        one that does not fit now waits outside, told when to try again (429)."""
        if samples > self.max_inflight_samples:
            raise InvalidRequest(
                f"{samples} samples (n for each prompt) in one request; this worker holds at "
                f"most {self.max_inflight_samples} at once",
                "n",
            )
        if inflight + samples > self.max_inflight_samples:
            raise Overloaded(
                f"the worker is full ({inflight} of {self.max_inflight_samples} samples "
                f"running or queued): retry after {self.retry_after_s} s",
                retry_after=self.retry_after_s,
            )

    def check_count(self, prompts: int, param: str) -> None:
        if prompts > self.max_prompts:
            raise InvalidRequest(
                f"{prompts} prompts in one request; at most {self.max_prompts}", param
            )

    def check(self, prompt_lengths: Sequence[int], max_tokens: int, fields: Fields) -> None:
        """Refuse a request whose prompts do not fit (InvalidRequest naming the field)."""
        self.check_count(len(prompt_lengths), fields.prompt)
        longest = max(prompt_lengths, default=0)
        if longest >= self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {longest} tokens, leaving none for the completion",
                fields.prompt,
            )
        if longest + max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens; "
                f"{longest} prompt tokens + {max_tokens} for the completion "
                f"(max_tokens) exceed it",
                fields.max_tokens,
            )
