"""The embedded engine: continuous batching with lossless speculation.

Every step is one forward pass over all running sequences and reads top to bottom:
schedule (admit waiting sequences into free KV slots), prepare drafts (from the speculation
core, drafter/speculator.py: budgets from the policy for the live batch, chain or tree drafts
from the rollout history), verify (one runner forward: each sequence's tokens not yet cached,
then its draft; a tree under a tree mask), accept (sample the target's token at each drafted
position with the counter-based RNG, up to the first that differs from the draft: the draft
tokens before it are kept, it is the bonus), record (append, stop checks, the speculation core;
every row after all are sampled) and collect the finished. Engine.stats.step_seconds sums the
time of each phase.

A tree draft is accepted by walking down from its root: the token at output position
generated + d is drawn from the logits of the depth-(d - 1) node on the path (the last
uncached token at d = 0); if a child of that node carries it, the walk moves there, else it
is the bonus token. The accepted path's K/V then move next to the sequence's tokens
(Runner.keep_path). Deterministic mode verifies chains only: a tree is cut to its most probable
root-to-leaf path (main_path), still lossless, just drafting less.

Because each position's token is drawn with a uniform keyed by (seed, sample index, position),
the accepted tokens are exactly those the target would have sampled one step at a time: the
output does not depend on drafts, batch companions or how many forwards it took.
"""

from __future__ import annotations

import dataclasses
import heapq
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from drafter.cost import SMOLLM2_CPU, CostCurve, CostModel, LiveStepCost, parse_cost_model
from drafter.draft import Draft
from drafter.groups import group_of
from drafter.history import RolloutHistory
from drafter.policy import Policy
from drafter.policy_spec import parse_policy, parse_policy_spec
from drafter.speculator import Publisher, SpecRequest, Speculator
from service.detokenizer import IncrementalDetokenizer
from service.engine.calibration import calibrate_cost
from service.engine.config import EngineConfig
from service.engine.models import Tokenizer, load_model
from service.engine.runner import Runner
from service.engine.sampling import Sampled, Span, sample, sample_spans
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
    text: str  # the text it gained from the character position asked for
    spec: SpecCounters  # cumulative for the sample
    seed: int
    result: SampleResult | None  # set once the sample has finished (its final output)


STEP_PHASES = ("schedule", "draft", "forward", "sample", "record")


@dataclass(slots=True)
class EngineStats:
    forward_passes: int = 0  # steps that ran the model
    prefill_tokens: int = 0  # cached-context tokens fed (prompts, and recomputation)
    generated_tokens: int = 0  # output tokens appended to sequences
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    finished_samples: int = 0
    # Seconds spent in each phase of step(), summed: admitting waiting samples ("schedule"),
    # the speculator's drafts ("draft"), the forward, sampling and acceptance with the cache
    # rollback ("sample"), appending tokens and the speculator's bookkeeping ("record").
    step_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_PHASES, 0.0))


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
    spec: SpecRequest | None = None  # the speculation core's handle, from admission on
    # Its text token by token, where stop strings or a stream need it before the end.
    text: IncrementalDetokenizer | None = None
    slot: int = -1  # its KV cache slot while running
    computed: int = 0  # leading tokens whose K/V sit in the slot; the rest are fed next step
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: int | str | None = None
    weight_version: int = 0

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
        publish: Publisher | None = None,
        cost_curve: CostCurve | LiveStepCost | None = None,
    ) -> None:
        """Loads config.model unless a model (and its tokenizer, or None) is given, and builds
        the policy config.speculation names unless one is given, pricing drafts with
        config.cost_model (calibrate: time this engine's verify step now, and price each
        step with the calibration's cost model for its batch size, drafter.cost.CostCurve,
        as the steps it then times while serving correct it, drafter.cost.LiveStepCost;
        `cost_curve` does either for a given policy).

        Every rollout that ends by itself joins `history` and then goes to `publish` (a worker
        shares it through Redis)."""
        self.config = config = config or EngineConfig()
        if model is None:
            model, tokenizer = load_model(config.model, config.device, config.torch_dtype)
        self.model, self.tokenizer = model, tokenizer
        self.runner = Runner(
            model, config.max_batch, config.max_model_len, deterministic=config.deterministic
        )
        self.history = history if history is not None else RolloutHistory(config.drafter)
        self.cost_source = "given with the policy"  # where policy.cost came from
        if policy is None:
            if parse_policy_spec(config.speculation).kind.startswith("das"):
                cost, self.cost_source, cost_curve = self._cost_model()
                policy = parse_policy(config.speculation, cost)
            else:
                policy = parse_policy(config.speculation)
        self.policy = policy
        # What the policy was built with; with a curve it is repriced at every step.
        self.cost = policy.cost
        self.speculator = Speculator(
            self.history, policy, max_draft=config.max_draft, publish=publish, cost_curve=cost_curve
        )
        self.stats = EngineStats()
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self._requests: dict[str, _Request] = {}
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._free_slots = list(range(config.max_batch))  # a heap: the lowest slot first
        self._paused = False

    def _cost_model(self) -> tuple[CostModel, str, LiveStepCost | None]:
        """config.cost_model, its source and its curve by batch size: a preset or given
        constants (no curve), or this engine's verify step timed now, then re-timed while it
        serves. An unusable timing falls back to the CPU preset on a CPU only: a GPU must never
        plan with a CPU's constants."""
        config = self.config
        cost = parse_cost_model(config.cost_model)
        if cost is not None:
            return cost, config.cost_model, None
        context = max(1, min(128, config.max_model_len - 10))
        on_cpu = config.device == "cpu"
        try:
            calibration = calibrate_cost(
                self.model, config.max_batch, context, fallback=SMOLLM2_CPU if on_cpu else None
            )
        except ValueError as error:
            raise ValueError(
                f"cost model calibration failed on {config.device} ({error}): "
                "set cost_model to C_BASE,C_TOK seconds"
            ) from error
        live = None if calibration.curve is None else LiveStepCost(calibration.curve)
        return calibration.cost, calibration.source, live

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

    def add_request(self, request: GenerateRequest, stream_text: bool = False) -> None:
        """Queue a request; it joins the batch at a later step. ValueError if it cannot run.
        `stream_text`: its text is wanted as it grows (progress()), not only at the end."""
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
        group = group_of(request.group, prompt)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        state = _Request(request.request_id, group, prompt, params, seed)
        tokenizer = self.tokenizer if stream_text or params.stop else None
        for index in range(params.n):
            sequence = _Sequence(state, index, list(prompt))
            if tokenizer is not None:
                sequence.text = IncrementalDetokenizer(
                    tokenizer,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop=params.no_stop_trim,
                )
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

    def progress(
        self, request_id: str, since: Sequence[int], since_text: Sequence[int]
    ) -> list[SampleProgress]:
        """Per sample of a live request, its output from token since[index] and text character
        since_text[index] on (what a stream has not sent yet); [] if the request is unknown
        (finished or aborted). Text grows only for requests added with stream_text."""
        state = self._requests.get(request_id)
        if state is None:
            return []
        if not len(since) == len(since_text) == len(state.sequences):
            raise ValueError(f"since needs one position per sample ({len(state.sequences)})")
        progress = []
        for sequence, start, start_text in zip(state.sequences, since, since_text, strict=True):
            begin = len(state.prompt) + start
            result = self._sample_result(sequence) if sequence.finish_reason is not None else None
            if result is not None:
                text = result.text[start_text:]
            else:
                text = "" if sequence.text is None else sequence.text.text_from(start_text)
            progress.append(
                SampleProgress(
                    index=sequence.index,
                    start=start,
                    token_ids=sequence.tokens[begin:],
                    logprobs=sequence.logprobs[start:],
                    top_logprobs=sequence.top_logprobs[start:]
                    if state.params.top_logprobs
                    else None,
                    text=text,
                    spec=_counters(sequence),
                    seed=state.seed,
                    result=result,
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
        seconds = self.stats.step_seconds
        start = time.perf_counter()
        self._schedule()
        batch = self._running
        if not batch:
            return []
        start = _lap(seconds, "schedule", start)
        drafts = self._prepare_drafts(batch)
        start = verify_start = _lap(seconds, "draft", start)
        prefilled = self.stats.prefill_tokens
        logits = self._verify(batch, drafts)
        start = _lap(seconds, "forward", start)
        outcomes = self._accept(batch, drafts, logits)
        start = _lap(seconds, "sample", start)
        if self.stats.prefill_tokens == prefilled:  # a prefill's step prices no draft
            tokens = len(batch) + sum(len(draft) for draft in drafts)
            self.speculator.time_step(len(batch), tokens, start - verify_start)
        # Recorded after every row is sampled: sampling a row streams a few vocabulary-sized
        # buffers through the caches, and the drafter's trees are cold after each.
        appended = [
            self._record(sequence, draft, sampled, accepted)
            for sequence, draft, (sampled, accepted) in zip(batch, drafts, outcomes, strict=True)
        ]
        self.speculator.extend_batch(
            [_handle(sequence) for sequence in batch],
            [sampled.token_ids[:n] for (sampled, _), n in zip(outcomes, appended, strict=True)],
            [len(draft) for draft in drafts],
            [accepted for _, accepted in outcomes],
        )
        finished = self._collect_finished()
        _lap(seconds, "record", start)
        return finished

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
            sequence.spec = self.speculator.start(
                state.request_id, state.group, sequence.tokens, sequence.index
            )
            self._running.append(sequence)
            budget -= cost
            admitted += 1
        self._waiting.extendleft(reversed(deferred))

    @staticmethod
    def _running_sibling(sequence: _Sequence) -> _Sequence | None:
        return next(
            (s for s in sequence.request.sequences if s is not sequence and s.slot >= 0), None
        )

    def _prepare_drafts(self, batch: list[_Sequence]) -> list[Draft]:
        # A draft longer than the tokens left to generate can never be used.
        left = [s.request.params.max_tokens - s.generated - 1 for s in batch]
        drafts = self.speculator.drafts([_handle(s) for s in batch], left)
        if self.runner.deterministic:  # the runner verifies chains only there
            drafts = [draft if draft.is_chain() else main_path(draft) for draft in drafts]
        return drafts

    def _verify(self, batch: list[_Sequence], drafts: list[Draft]) -> Tensor:
        """One forward: per sequence its uncached tokens then its draft (a tree under its
        tree mask); logits of the last uncached token and of every draft token."""
        chunks = [s.tokens[s.computed :] + d.token_ids for s, d in zip(batch, drafts, strict=True)]
        trees = [None if draft.is_chain() else draft.parents for draft in drafts]
        logits = self.runner.forward(
            [sequence.slot for sequence in batch],
            chunks,
            [len(draft) + 1 for draft in drafts],
            trees if any(tree is not None for tree in trees) else None,
        )
        self.stats.forward_passes += 1
        self.stats.prefill_tokens += sum(len(s.tokens) - s.computed - 1 for s in batch)
        return logits

    def _accept(
        self, batch: list[_Sequence], drafts: list[Draft], logits: Tensor
    ) -> list[tuple[Sampled, int]]:
        """Per sequence, the target's tokens at its drafted positions (logits: its draft's
        rows, after the rows of the sequences before it): the accepted draft prefix (a tree's:
        the accepted root-to-node path) and the bonus token after it; and how many draft
        tokens were accepted. The chains' rows are sampled together (sample_spans)."""
        outcomes: list[tuple[Sampled, int] | None] = [None] * len(batch)
        spans: list[Span] = []
        chains: list[int] = []
        offset = 0
        for i, (sequence, draft) in enumerate(zip(batch, drafts, strict=True)):
            rows = len(draft) + 1
            if draft.is_chain():
                state = sequence.request
                spans.append(
                    Span(
                        offset,
                        rows,
                        state.params,
                        state.seed,
                        sequence.index,
                        sequence.generated,
                        draft.token_ids,  # drawn up to the first rejected position only
                    )
                )
                chains.append(i)
            else:
                outcomes[i] = self._accept_tree(sequence, draft, logits[offset : offset + rows])
            offset += rows
        for i, sampled in zip(
            chains, sample_spans(logits, spans, self.config.logprobs_mode), strict=True
        ):
            sequence = batch[i]
            accepted = len(sampled.token_ids) - 1
            # The cache now holds the tokens and the whole draft: roll back the rejected part.
            # The bonus token is not cached yet; it is fed with the next step's draft.
            sequence.computed = len(sequence.tokens) + accepted
            self.runner.truncate(sequence.slot, sequence.computed)
            outcomes[i] = (sampled, accepted)
        done = [outcome for outcome in outcomes if outcome is not None]
        assert len(done) == len(batch), "every sequence's rows were sampled"
        return done

    def _accept_tree(self, sequence: _Sequence, draft: Draft, rows: Tensor) -> tuple[Sampled, int]:
        """_accept for a tree: rows[0] predicts the token after the sequence, rows[j + 1]
        the token after draft node j's path. Only the rows on the walked path are sampled,
        each at its own output position."""
        state = sequence.request
        children: dict[int, dict[int, int]] = {}
        for node, (token, parent) in enumerate(zip(draft.token_ids, draft.parents, strict=True)):
            children.setdefault(parent, {}).setdefault(token, node)  # the first of duplicates
        path: list[int] = []
        drawn: list[Sampled] = []
        node = -1
        while True:
            one = sample(
                rows[node + 1 : node + 2],
                state.params,
                state.seed,
                sequence.index,
                sequence.generated + len(path),
                self.config.logprobs_mode,
            )
            drawn.append(one)
            child = children.get(node, {}).get(one.token_ids[0])
            if child is None:
                break
            path.append(child)
            node = child
        tops = [d.top_logprobs[0] for d in drawn if d.top_logprobs is not None]
        sampled = Sampled(
            [d.token_ids[0] for d in drawn],
            [d.logprobs[0] for d in drawn],
            tops if state.params.top_logprobs else None,
        )
        # The tree sits in the cache after the tokens: keep its accepted path only.
        base = len(sequence.tokens)
        self.runner.keep_path(sequence.slot, base, path)
        sequence.computed = base + len(path)
        return sampled, len(path)

    def _record(self, sequence: _Sequence, draft: Draft, sampled: Sampled, accepted: int) -> int:
        """Append the step's tokens to the sequence up to where it stops; how many."""
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
        self.stats.generated_tokens += appended
        self.stats.drafted_tokens += len(draft)
        self.stats.accepted_tokens += min(accepted, appended)
        return appended

    def _finished_by(self, sequence: _Sequence, token: int, params: SamplingParams) -> bool:
        """Set the finish reason if `token`, just appended, ends the sequence. Stop tokens come
        first; then the token joins the sample's text, which may complete a stop string."""
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            sequence.finish_reason, sequence.matched_stop = "stop", token
        elif sequence.text is not None and (stop := sequence.text.push(token)) is not None:
            sequence.finish_reason, sequence.matched_stop = "stop", stop
        elif sequence.generated >= params.max_tokens:
            sequence.finish_reason = "length"
        return sequence.finish_reason is not None

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
        self.speculator.finish(_handle(sequence), natural=record)
        self.stats.finished_samples += 1

    # -- outputs ----------------------------------------------------------------------------

    def _request_output(self, state: _Request) -> RequestOutput:
        samples = [self._sample_result(s) for s in state.sequences]
        finished = all(s.finish_reason is not None for s in state.sequences)
        return RequestOutput(state.request_id, state.group, state.prompt, samples, finished)

    def _sample_result(self, sequence: _Sequence) -> SampleResult:
        params = sequence.request.params
        output = sequence.output
        matched = sequence.matched_stop
        if sequence.text is not None:  # a stop token ended it unpushed: the text decodes it
            text = sequence.text.finish(matched if isinstance(matched, int) else None)
        elif self.tokenizer is not None:  # decoded once, at the end
            decoded = self.tokenizer.decode(output, skip_special_tokens=params.skip_special_tokens)
            text = str(decoded)
        else:
            text = ""
        spec = sequence.spec
        length_class = "unknown" if spec is None else self.speculator.length_class(spec)
        return SampleResult(
            index=sequence.index,
            token_ids=output,
            text=text,
            logprobs=list(sequence.logprobs) if params.logprobs else None,
            top_logprobs=list(sequence.top_logprobs) if params.top_logprobs else None,
            finish_reason=sequence.finish_reason or "abort",
            matched_stop=sequence.matched_stop,
            seed=sequence.request.seed,
            spec=_counters(sequence),
            group=sequence.request.group,
            weight_version=sequence.weight_version,
            length_class=length_class,
        )


def _lap(seconds: dict[str, float], phase: str, start: float) -> float:
    """Adds the time since `start` to `phase`; returns now."""
    now = time.perf_counter()
    seconds[phase] += now - start
    return now


def main_path(draft: Draft) -> Draft:
    """The chain a tree draft's most probable root-to-leaf path makes: from the root, the most
    probable child each time (the first on ties), with its probabilities."""

    def prob(node: int) -> float:
        return draft.probs[node] if draft.probs else 0.0

    children: dict[int, list[int]] = {}
    for node, parent in enumerate(draft.parents):
        children.setdefault(parent, []).append(node)
    path: list[int] = []
    node = -1
    while node in children:
        node = max(children[node], key=lambda child: (prob(child), -child))
        path.append(node)
    probs = [draft.probs[i] for i in path] if draft.probs else []
    return dataclasses.replace(
        draft,
        token_ids=[draft.token_ids[i] for i in path],
        parents=list(range(-1, len(path) - 1)),
        probs=probs,
        score=sum(probs),
    )


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


def _handle(sequence: _Sequence) -> SpecRequest:
    """The speculation core's handle of a running sequence (it has one from admission on)."""
    assert sequence.spec is not None, "a running sequence has a speculation handle"
    return sequence.spec


def _counters(sequence: _Sequence) -> SpecCounters:
    if sequence.spec is None:  # never admitted
        return SpecCounters()
    c = sequence.spec.counters
    return SpecCounters(
        c.forward_passes,
        c.drafted,
        c.accepted,
        dict(c.drafted_by_source),
        dict(c.accepted_by_source),
    )
