"""The embedded engine: continuous batching with lossless speculation.

Every step is one forward pass over all running sequences and reads top to bottom:
schedule (admit waiting sequences into free KV slots), prepare drafts (a budget per sequence
from the speculation policy, a chain draft from the rollout history), verify (one runner
forward: each sequence's tokens not yet cached, then its draft), accept (sample the target's
token at every drafted position with the counter-based RNG; keep draft tokens while they equal
it; the first sampled token that differs is the bonus), record (append, stop checks, history,
counters) and collect the finished.

Because each position's token is drawn with a uniform keyed by (seed, sample index, position),
the accepted tokens are exactly those the target would have sampled one step at a time: the
output does not depend on drafts, batch companions or how many forwards it took.
"""

from __future__ import annotations

import heapq
import secrets
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from drafter.das import DasPolicy
from drafter.history import RolloutHistory
from drafter.policy import Policy, RequestView
from drafter.policy_spec import parse_policy
from service.engine.config import EngineConfig
from service.engine.models import Tokenizer, load_model
from service.engine.runner import Runner
from service.engine.sampling import Sampled, sample
from service.fake_worker import prompt_group
from service.worker import (
    FinishReason,
    GenerateRequest,
    SampleResult,
    SamplingParams,
    SpecCounters,
)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    group: str
    prompt_token_ids: list[int]
    samples: list[SampleResult]  # by sample index
    finished: bool = True


@dataclass(slots=True)
class SampleProgress:
    """What one sample of a live request holds from output position `start` on (streaming)."""

    index: int
    start: int  # output position of token_ids[0]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None
    spec: SpecCounters  # cumulative for the sample
    seed: int
    result: SampleResult | None  # set once the sample has finished (its final output)


# (group, prompt token ids, output token ids, policy version) of a rollout that ended by itself.
RolloutSink = Callable[[str, list[int], list[int], int], None]


@dataclass(slots=True)
class EngineStats:
    forward_passes: int = 0  # steps that ran the model
    prefill_tokens: int = 0  # cached-context tokens fed (prompts, and recomputation)
    generated_tokens: int = 0  # output tokens appended to sequences
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    finished_samples: int = 0


@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    group: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    sequences: list[_Sequence] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Sequence:
    request: _Request
    index: int  # sample index within the request: part of every RNG key
    tokens: list[int]  # the prompt, then the output so far
    view: RequestView  # what the speculation policy sees of it
    slot: int = -1  # its KV cache slot while running
    computed: int = 0  # leading tokens whose K/V sit in the slot; the rest are fed next step
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    spec: SpecCounters = field(default_factory=SpecCounters)
    weight_version: int = 0

    @property
    def key(self) -> tuple[str, int]:  # its id in the rollout history
        return (self.request.request_id, self.index)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.request.prompt) :]

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
        history: RolloutHistory | None = None,
        policy: Policy | None = None,
        rollout_sink: RolloutSink | None = None,
    ) -> None:
        """Loads config.model unless a model (and its tokenizer, or None) is given.

        `rollout_sink` receives every finished rollout instead of the history (a service sends
        it through its shared store, which feeds the history back in); default: the history.
        """
        self.config = config = config or EngineConfig()
        if model is None:
            model, tokenizer = load_model(config.model, config.device, config.torch_dtype)
        self.model, self.tokenizer = model, tokenizer
        self.runner = Runner(
            model, config.max_batch, config.max_model_len, deterministic=config.deterministic
        )
        self.history = history if history is not None else RolloutHistory(config.drafter)
        self.policy = policy if policy is not None else parse_policy(config.speculation)
        self._sink = rollout_sink or self._add_rollout
        self.stats = EngineStats()
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        # Without drafting the per-request suffix trees are not worth maintaining.
        self._drafting = config.max_draft > 0 and self.policy.name != "none"
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._free_slots = list(range(config.max_batch))  # a heap: the lowest slot first
        self._paused = False

    # -- requests ---------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self.history.version

    @property
    def paused(self) -> bool:
        return self._paused

    def num_running(self) -> int:
        return len(self._running)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def add_request(self, request: GenerateRequest) -> None:
        """Queue a request; it joins the batch at a later step. ValueError if it cannot run."""
        params = request.params
        prompt = [int(t) for t in request.prompt_token_ids]
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already running")
        if len(prompt) + params.max_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceed "
                f"max_model_len {self.config.max_model_len}"
            )
        if min(prompt) < 0 or max(prompt) >= self.runner.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a model with a tokenizer")
        group = request.group or prompt_group(prompt)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        state = _Request(request.request_id, group, prompt, params, seed)
        for index in range(params.n):
            sequence = _Sequence(state, index, list(prompt), RequestView(group))
            state.sequences.append(sequence)
            self._waiting.append(sequence)
        self._requests[request.request_id] = state

    def generate(self, requests: Sequence[GenerateRequest]) -> list[RequestOutput]:
        """Run these requests to completion on an otherwise idle engine; outputs in order."""
        if self._paused:
            raise ValueError("the engine is paused")
        if self._requests:
            raise ValueError("generate() needs an idle engine: drive step() instead")
        for request in requests:
            self.add_request(request)
        done: dict[str, RequestOutput] = {}
        while self._requests:
            for output in self.step():
                done[output.request_id] = output
        return [done[request.request_id] for request in requests]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its partial output (finish_reason "abort"), None if unknown."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        for sequence in state.sequences:
            if sequence.finish_reason is None:
                sequence.finish_reason = "abort"
                sequence.weight_version = self.weight_version
                if sequence.slot >= 0:
                    self._release(sequence, record=False)
                else:
                    self._waiting.remove(sequence)
        return self._request_output(state)

    def abort_all(self) -> list[RequestOutput]:
        return [output for rid in list(self._requests) if (output := self.abort(rid))]

    def progress(self, request_id: str, since: Sequence[int]) -> list[SampleProgress]:
        """Per sample of a live request, its output from position since[index] on (what a
        stream has not sent yet); [] if the request is unknown (finished or aborted)."""
        state = self._requests.get(request_id)
        if state is None:
            return []
        if len(since) != len(state.sequences):
            raise ValueError(f"since needs one position per sample ({len(state.sequences)})")
        progress = []
        for sequence, start in zip(state.sequences, since, strict=True):
            begin = len(state.prompt) + start
            progress.append(
                SampleProgress(
                    index=sequence.index,
                    start=start,
                    token_ids=sequence.tokens[begin:],
                    logprobs=sequence.logprobs[start:],
                    top_logprobs=sequence.top_logprobs[start:]
                    if state.params.top_logprobs
                    else None,
                    spec=SpecCounters(
                        sequence.spec.forward_passes,
                        sequence.spec.drafted_tokens,
                        sequence.spec.accepted_tokens,
                    ),
                    seed=state.seed,
                    result=self._sample_result(sequence)
                    if sequence.finish_reason is not None
                    else None,
                )
            )
        return progress

    # -- control ----------------------------------------------------------------------------

    def pause(self) -> None:
        """Hold every request between steps (step() does nothing) until resume()."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    def flush_cache(self) -> None:
        """Drop every KV cache; running sequences recompute theirs at their next step."""
        self.runner.reset()
        for sequence in self._running:
            sequence.computed = 0

    def update_weights(self, path: str, version: int | None = None) -> int:
        """Load weights of the same architecture from `path` (see load_model); the new policy
        version (default: the current one + 1). The rollout history is kept, and windowed."""
        model, _ = load_model(path, self.config.device, self.config.torch_dtype)
        return self.load_weights(model, version)

    def load_weights(self, model: torch.nn.Module, version: int | None = None) -> int:
        new_version = self.weight_version + 1 if version is None else version
        if new_version < self.weight_version:
            raise ValueError(f"policy version must not go back: {new_version}")
        old, new = self.model.config, model.config
        for name in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
            if getattr(old, name) != getattr(new, name):
                raise ValueError(f"new weights differ in {name}: {getattr(new, name)}")
        self.runner.load_weights(model)
        self.model = model
        self.flush_cache()  # cached K/V came from the old weights
        self.history.set_version(new_version)
        return new_version

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward pass over the running batch; the requests that finished in it."""
        if self._paused:
            return []
        self._schedule()
        batch = self._running
        if not batch:
            return []
        drafts = self._prepare_drafts(batch)
        logits = self._verify(batch, drafts)
        offset = 0
        for sequence, draft in zip(batch, drafts, strict=True):
            rows = logits[offset : offset + len(draft) + 1]
            offset += len(draft) + 1
            sampled, accepted = self._accept(sequence, draft, rows)
            self._record(sequence, draft, sampled, accepted)
        return self._collect_finished()

    def _schedule(self) -> None:
        """Admit waiting sequences into free slots, up to max_prefill_tokens of prompt.

        A sample whose sibling (same request) holds the prompt's K/V copies it rather than
        recomputing it; one whose sibling is being prefilled waits a step for that copy.
        """
        budget = self.config.max_prefill_tokens
        admitted = 0
        deferred: list[_Sequence] = []
        while self._waiting and self._free_slots:
            sequence = self._waiting.popleft()
            prefix = len(sequence.request.prompt) - 1  # all but the last prompt token
            source = self._running_sibling(sequence) if prefix > 0 else None
            if source is not None and source.computed < prefix:
                deferred.append(sequence)
                continue
            cost = len(sequence.tokens) - (prefix if source is not None else 0)
            if cost > budget and admitted:
                self._waiting.appendleft(sequence)
                break
            sequence.slot = heapq.heappop(self._free_slots)
            if source is not None:
                self.runner.copy_prefix(source.slot, sequence.slot, prefix)
                sequence.computed = prefix
            else:
                self.runner.reset(sequence.slot)
                sequence.computed = 0
            state = sequence.request
            sequence.view = self.policy.request(state.group)
            if self._drafting:
                self.history.start_request(sequence.key, state.group, sequence.tokens)
            self._running.append(sequence)
            budget -= cost
            admitted += 1
        self._waiting.extendleft(reversed(deferred))

    @staticmethod
    def _running_sibling(sequence: _Sequence) -> _Sequence | None:
        return next(
            (s for s in sequence.request.sequences if s is not sequence and s.slot >= 0), None
        )

    def _prepare_drafts(self, batch: list[_Sequence]) -> list[list[int]]:
        if not self._drafting:
            return [[] for _ in batch]
        budgets = self.policy.budgets([sequence.view for sequence in batch])
        drafts = []
        for sequence, budget in zip(batch, budgets, strict=True):
            # A draft longer than the tokens left to generate can never be used.
            left = sequence.request.params.max_tokens - sequence.generated - 1
            size = min(budget, self.config.max_draft, left)
            drafts.append(self.history.speculate(sequence.key, size).token_ids if size > 0 else [])
        return drafts

    def _verify(self, batch: list[_Sequence], drafts: list[list[int]]) -> Tensor:
        """One forward: per sequence its uncached tokens then its draft; logits of the last
        uncached token and of every draft token."""
        chunks = [s.tokens[s.computed :] + d for s, d in zip(batch, drafts, strict=True)]
        logits = self.runner.forward(
            [sequence.slot for sequence in batch], chunks, [len(draft) + 1 for draft in drafts]
        )
        self.stats.forward_passes += 1
        self.stats.prefill_tokens += sum(len(s.tokens) - s.computed - 1 for s in batch)
        return logits

    def _accept(self, sequence: _Sequence, draft: list[int], rows: Tensor) -> tuple[Sampled, int]:
        """The target's tokens at the drafted positions: the accepted draft prefix and the
        bonus token after it; and how many draft tokens were accepted."""
        state = sequence.request
        sampled = sample(
            rows,
            state.params,
            state.seed,
            sequence.index,
            sequence.generated,
            self.config.logprobs_mode,
        )
        accepted = 0
        while accepted < len(draft) and draft[accepted] == sampled.token_ids[accepted]:
            accepted += 1
        keep = accepted + 1
        sampled.token_ids = sampled.token_ids[:keep]
        sampled.logprobs = sampled.logprobs[:keep]
        if sampled.top_logprobs is not None:
            sampled.top_logprobs = sampled.top_logprobs[:keep]
        # The cache now holds the tokens and the whole draft: roll back the rejected part.
        # The bonus token is not cached yet; it is fed with the next step's draft.
        sequence.computed = len(sequence.tokens) + accepted
        self.runner.truncate(sequence.slot, sequence.computed)
        return sampled, accepted

    def _record(
        self, sequence: _Sequence, draft: list[int], sampled: Sampled, accepted: int
    ) -> None:
        params = sequence.request.params
        appended = 0
        for i, token in enumerate(sampled.token_ids):
            sequence.tokens.append(token)
            sequence.logprobs.append(sampled.logprobs[i])
            if sampled.top_logprobs is not None:
                sequence.top_logprobs.append(sampled.top_logprobs[i])
            appended += 1
            if self._finished_by(sequence, token, params):
                break
        # The policy learns what verification accepted; the counters count what was kept.
        self.policy.observe_step(sequence.request.group, len(draft), accepted)
        accepted = min(accepted, appended)
        sequence.view = sequence.view.advanced(appended)
        sequence.spec.forward_passes += 1
        sequence.spec.drafted_tokens += len(draft)
        sequence.spec.accepted_tokens += accepted
        self.stats.generated_tokens += appended
        self.stats.drafted_tokens += len(draft)
        self.stats.accepted_tokens += accepted
        if self._drafting and sequence.finish_reason is None:
            self.history.extend_request(sequence.key, sampled.token_ids[:appended])

    def _finished_by(self, sequence: _Sequence, token: int, params: SamplingParams) -> bool:
        """Set the finish reason if `token`, just appended, ends the sequence."""
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            sequence.finish_reason, sequence.matched_stop = "stop", token
        elif params.stop and (stop := self._stop_string(sequence, params)) is not None:
            sequence.finish_reason, sequence.matched_stop = "stop", stop
        elif sequence.generated >= params.max_tokens:
            sequence.finish_reason = "length"
        return sequence.finish_reason is not None

    def _stop_string(self, sequence: _Sequence, params: SamplingParams) -> str | None:
        # Checked after every token, so a match must end in the newest one: decoding a tail
        # a little longer than the longest stop string suffices.
        window = max(len(stop) for stop in params.stop) + 4
        text = self._decode(sequence.output[-window:], params)
        return next((stop for stop in params.stop if stop in text), None)

    def _collect_finished(self) -> list[RequestOutput]:
        done = [sequence for sequence in self._running if sequence.finish_reason is not None]
        finished_requests: dict[str, _Request] = {}  # insertion-ordered, each once
        for sequence in done:
            self._release(sequence, record=True)
            state = sequence.request
            if all(s.finish_reason is not None for s in state.sequences):
                finished_requests[state.request_id] = state
        outputs = []
        for state in finished_requests.values():
            del self._requests[state.request_id]
            outputs.append(self._request_output(state))
        return outputs

    def _release(self, sequence: _Sequence, record: bool) -> None:
        """Free a finished sequence's slot; a rollout that ended by itself joins the history."""
        self._running.remove(sequence)
        heapq.heappush(self._free_slots, sequence.slot)
        sequence.slot = -1
        sequence.weight_version = self.weight_version
        state = sequence.request
        if self._drafting:
            self.history.stop_request(sequence.key)
        self.stats.finished_samples += 1
        if record:
            output = sequence.output
            self._sink(state.group, state.prompt, output, self.weight_version)
            self.policy.observe_finished(state.group, len(output))

    def _add_rollout(self, group: str, prompt: list[int], output: list[int], version: int) -> None:
        self.history.add_rollout(group, output, version, prompt)

    # -- outputs ----------------------------------------------------------------------------

    def _request_output(self, state: _Request) -> RequestOutput:
        samples = [self._sample_result(s) for s in state.sequences]
        finished = all(s.finish_reason is not None for s in state.sequences)
        return RequestOutput(state.request_id, state.group, state.prompt, samples, finished)

    def _sample_result(self, sequence: _Sequence) -> SampleResult:
        params = sequence.request.params
        output = sequence.output
        text = self._decode(output, params)
        if isinstance(sequence.matched_stop, str) and not params.no_stop_trim:
            text = text[: max(0, text.find(sequence.matched_stop))]
        length_class = "unknown"
        if isinstance(self.policy, DasPolicy):
            length_class = self.policy.predict(sequence.view).length_class.name.lower()
        return SampleResult(
            index=sequence.index,
            token_ids=output,
            text=text,
            logprobs=list(sequence.logprobs) if params.logprobs else None,
            top_logprobs=list(sequence.top_logprobs) if params.top_logprobs else None,
            finish_reason=sequence.finish_reason or "abort",
            matched_stop=sequence.matched_stop,
            seed=sequence.request.seed,
            spec=SpecCounters(
                sequence.spec.forward_passes,
                sequence.spec.drafted_tokens,
                sequence.spec.accepted_tokens,
            ),
            group=sequence.request.group,
            weight_version=sequence.weight_version,
            length_class=length_class,
        )

    def _decode(self, token_ids: list[int], params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        text: str = self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)
        return text


def _eos_token_ids(model: torch.nn.Module, tokenizer: Tokenizer | None) -> frozenset[int]:
    found: set[int] = set()
    sources = [getattr(model, "generation_config", None), model.config, tokenizer]
    for source in sources:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(int(v) for v in value)
    return frozenset(found)
