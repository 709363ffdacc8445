"""What one request may ask of a worker: the checks Generation runs before any work starts.

The wire models (service.protocol) bound each value on its own; these bounds depend on the
worker and the deployment (Settings): the context (prompt + max_tokens of one sequence, 400
as vLLM answers) and the prompts in one request. `Fields` names the request fields a dialect
calls the prompt and max_tokens, so a refusal's `param` is the field the client sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.errors import InvalidRequest

FAKE_MAX_MODEL_LEN = 1 << 15  # the FakeWorker's context: it has no model to take one from


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

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")

    def check(self, prompt_lengths: Sequence[int], max_tokens: int, fields: Fields) -> None:
        """Refuse a request whose prompts do not fit (InvalidRequest naming the field)."""
        if len(prompt_lengths) > self.max_prompts:
            raise InvalidRequest(
                f"{len(prompt_lengths)} prompts in one request; at most {self.max_prompts}",
                fields.prompt,
            )
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
