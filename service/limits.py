"""What one request may ask of a worker: the checks Generation runs before any work starts.

The wire models (service.protocol) bound each value on its own; these bounds depend on the
worker and the deployment (Settings): the context (prompt + max_tokens of one sequence, 400
as vLLM answers), the prompts in one request, n, and the stop strings' count and length.
`Fields` names the request fields a dialect calls the prompt, max_tokens, n and stop, so a
refusal's `param` is the field the client sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    n: str = "n"
    stop: str = "stop"


OPENAI_FIELDS = Fields()


@dataclass(frozen=True, slots=True)
class Limits:
    max_model_len: int  # prompt + output tokens of one sequence
    max_prompts: int = 256  # prompts in one request
    max_inflight_samples: int = 4096  # samples running or queued on the worker at once
    max_n: int = 128  # samples per prompt
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 1024  # characters of one stop string
    retry_after_s: int = 1  # what a refused client is told to wait

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        for name in ("max_prompts", "max_inflight_samples", "max_n", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_stop < 0:
            raise ValueError(f"max_stop must be >= 0, got {self.max_stop}")

    def check_sampling(self, n: int, stop: Sequence[str], fields: Fields) -> None:
        """Refuse more samples per prompt, or more or longer stop strings, than configured."""
        if n > self.max_n:
            raise InvalidRequest(f"n is {n}; at most {self.max_n} samples per prompt", fields.n)
        if len(stop) > self.max_stop:
            raise InvalidRequest(f"{len(stop)} stop strings; at most {self.max_stop}", fields.stop)
        longest = max((len(s) for s in stop), default=0)
        if longest > self.max_stop_chars:
            raise InvalidRequest(
                f"a stop string of {longest} characters; at most {self.max_stop_chars}",
                fields.stop,
            )

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


# -- the gateway's admission per API key -------------------------------------------------------


@dataclass(slots=True)
class KeyBudget:
    """Samples each API key has running or queued through the gateway, and at most `limit`
    (None: no limit, nothing counted). One key saturating its budget is told to retry (429)
    while the others are still served: a runaway client cannot fill every worker."""

    limit: int | None
    retry_after_s: int = 1
    inflight: dict[str, int] = field(default_factory=dict)  # key -> samples; no zero entries

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")

    def acquire(self, key: str, samples: int) -> Callable[[], None]:
        """Admit `samples` for `key`, or refuse (400: never fits; 429: not now); the function
        that gives them back (idempotent)."""
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if self.limit is None:
            return _nothing
        if samples > self.limit:
            raise InvalidRequest(
                f"{samples} samples (n for each prompt) in one request; an API key holds at "
                f"most {self.limit} at once",
                "n",
            )
        held = self.inflight.get(key, 0)
        if held + samples > self.limit:
            raise Overloaded(
                f"this API key has {held} of its {self.limit} samples running or queued: "
                f"retry after {self.retry_after_s} s",
                retry_after=self.retry_after_s,
            )
        self.inflight[key] = held + samples
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.inflight[key] - samples
            if left:
                self.inflight[key] = left
            else:
                del self.inflight[key]

        return release


def _nothing() -> None:
    return None


def requested_samples(path: str, body: Mapping[str, Any]) -> int:
    """The samples a generation body asks for (n for each prompt), as the gateway counts them
    before a worker has validated the body: a field of the wrong shape counts as 1 (the
    worker refuses that body; no sample runs)."""
    if path == "/v1/completions":
        prompts, n = _prompt_count(body.get("prompt")), body.get("n")
    elif path == "/v1/chat/completions":
        prompts, n = 1, body.get("n")
    else:  # /generate (SGLang) and /inference/v1/generate (vLLM): n in sampling_params
        sampling = body.get("sampling_params")
        n = sampling.get("n") if isinstance(sampling, dict) else None
        prompts = 1
        if path == "/generate":
            prompts = _prompt_count(body.get("text", body.get("input_ids")))
    count = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    return prompts * count


def _prompt_count(prompt: Any) -> int:
    """A batch is a list of texts or of token id lists; a text or token ids is one prompt."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return len(prompt)
    return 1
