"""FakeWorker: a deterministic worker with no model, so the service runs and is tested anywhere.

Tokenizer: byte level (ids 0..255 are bytes), plus BOS 256 and EOS 257 (special tokens).

"Model": each prompt has a base answer (lowercase letters and spaces, a length in [16, 256))
drawn from a hash of its token ids. Sample `index` of a request with `seed` follows the base
answer but deviates at a position with probability 0.15 * temperature * top_p, and ends near
the base length (log-normal jitter growing with temperature). Every draw is a pure function of
(seed, sample index, prompt) and the position, so outputs and logprobs are reproducible, a
shorter max_tokens gives a prefix of a longer one, and temperature 0 (or top_k 1) gives the
base answer. Samples of one prompt share their base answer, so a group's history predicts
new samples well, as RL rollouts do.

Speculation is simulated honestly: per forward pass the group history drafts up to
`spec_budget` tokens (RolloutHistory.speculate), the draft is checked against the tokens the
"target" produces there, and the accepted run plus one target token is emitted: the spec
counters are those a real engine with this drafter would report. A sample's output is computed
up front (numpy, no per-token Python work) and revealed one forward pass at a time;
`step_delay_s` sleeps per pass so abort and pause can be exercised mid-generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from drafter import RolloutHistory
from drafter.groups import group_of, prompt_group
from service.errors import InvalidRequest
from service.history_store import HistoryStore
from service.metrics import length_class
from service.worker import (
    FinishReason,
    GenerateRequest,
    SampleDelta,
    SampleResult,
    SamplingParams,
    SpecCounters,
    check_version_forward,
)

BOS = 256
EOS = 257
VOCAB_SIZE = 258
_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8).astype(np.int32)
_BASE_CACHE = 4096  # prompts whose base answer stays cached
_DEVIATION = 0.15  # chance per position, at temperature 1, of leaving the base answer
# A sample's own tree covers this much of the prompt: drafts continue the context's suffix
# (at most max_depth tokens), so the prompt's tail is what they need, and a tree over a long
# prompt per sample would hold the event loop (n = 128 over 32k tokens: seconds).
_PROMPT_TAIL = 1024


def _prompt_hash(token_ids: Sequence[int]) -> int:
    return int(prompt_group(token_ids), 16)


@dataclass(slots=True)
class _Plan:
    """One sample's whole output, computed up front and revealed pass by pass."""

    index: int
    seed: int
    tokens: npt.NDArray[np.int32]
    logprobs: npt.NDArray[np.float64]
    finish_reason: FinishReason
    matched_stop: int | str | None
    text: str  # the final text (stop trimmed unless no_stop_trim)
    text_ends: npt.NDArray[np.int64]  # text_ends[i]: chars of text produced by tokens[: i + 1]
    key: Hashable  # its live request in the history
    pos: int = 0  # tokens revealed so far
    spec: SpecCounters = field(default_factory=SpecCounters)


@dataclass(slots=True)
class _Live:
    aborted: asyncio.Event
    queued: bool = False


class FakeWorker:
    def __init__(
        self,
        store: HistoryStore,
        model_name: str = "fake",
        speculation: bool = True,
        spec_budget: int = 8,
        step_delay_s: float = 0.0,
    ) -> None:
        if spec_budget < 0:
            raise ValueError(f"spec_budget must be >= 0, got {spec_budget}")
        if step_delay_s < 0:
            raise ValueError(f"step_delay_s must be >= 0, got {step_delay_s}")
        self.store = store
        self.history = RolloutHistory(store.config)  # drafts come from here; the store feeds it
        store.use_history(self.history)
        self._model_name = model_name
        self._budget = spec_budget if speculation else 0
        self._delay = step_delay_s
        self._version = 0
        self._weights_path: str | None = None  # the path the last update named
        self._gate = asyncio.Event()  # set while not paused
        self._gate.set()
        self._live: dict[str, _Live] = {}
        self._seeds = random.Random()
        self._bases: OrderedDict[int, npt.NDArray[np.int32]] = OrderedDict()
        self.cache_flushes = 0

    # -- state --------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def paused(self) -> bool:
        return not self._gate.is_set()

    def load(self) -> tuple[int, int]:
        """(running, queued) requests; queued ones wait for a paused worker to resume."""
        queued = sum(live.queued for live in self._live.values())
        return len(self._live) - queued, queued

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.abort(None)
        await self.store.close()

    def health(self) -> dict[str, Any]:
        return {
            "status": "paused" if self.paused else "ok",
            "model": self._model_name,
            "weight_version": self._version,
        }

    def server_info(self) -> dict[str, Any]:
        running, queued = self.load()
        return {
            "model_path": self._model_name,
            "weights_path": self._weights_path,
            "served_model_name": self._model_name,
            "backend": "fake",
            "vocab_size": VOCAB_SIZE,
            "eos_token_id": EOS,
            "speculation": self._budget > 0,
            "spec_budget": self._budget,
            "weight_version": str(self._version),
            "paused": self.paused,
            "running_requests": running,
            "queued_requests": queued,
            "history_groups": len(self.history.groups()),
            "history_tokens": self.history.num_tokens(),
            "redis": self.store.redis is not None,
            "redis_up": self.store.redis_up,
            "buffered_rollouts": self.store.pending,
        }

    # -- tokenizer ----------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for token in token_ids:
            if 0 <= token < 256:
                out.append(token)
            elif not skip_special_tokens:
                out += b"<s>" if token == BOS else b"</s>"
        return out.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return [BOS, *self.tokenize(text + "<|assistant|>\n")]

    # -- control ------------------------------------------------------------------------

    async def abort(self, request_id: str | None = None) -> int:
        targets = list(self._live.values()) if request_id is None else []
        if request_id is not None and request_id in self._live:
            targets = [self._live[request_id]]
        for live in targets:
            live.aborted.set()
        return len(targets)

    async def pause(self) -> None:
        self._gate.clear()

    async def resume(self) -> None:
        self._gate.set()

    async def update_weights(self, path: str) -> int:
        return await self.update_weights_to(path, self._version + 1)

    async def update_weights_to(self, path: str, version: int) -> int:
        if not path:
            raise InvalidRequest("model_path must not be empty", "model_path")
        check_version_forward(version, self._version)
        self._version = version  # the fake has no weights: a new path is a new policy
        self._weights_path = path
        await self.store.set_version(version)
        return version

    async def flush_cache(self) -> None:
        self.cache_flushes += 1  # no KV cache here; the history is deliberately untouched

    # -- generation ---------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> list[SampleResult]:
        n = request.params.n
        tokens: list[list[int]] = [[] for _ in range(n)]
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        tops: list[list[dict[int, float]]] = [[] for _ in range(n)]
        results: list[SampleResult | None] = [None] * n
        group = group_of(request.group, request.prompt_token_ids)
        async for delta in self.stream(request):
            i = delta.index
            tokens[i] += delta.token_ids
            texts[i].append(delta.text)
            if delta.logprobs is not None:
                logprobs[i] += delta.logprobs
            if delta.top_logprobs is not None:
                tops[i] += delta.top_logprobs
            if delta.finish_reason is not None:
                results[i] = SampleResult(
                    index=i,
                    token_ids=tokens[i],
                    text="".join(texts[i]),
                    logprobs=logprobs[i] if request.params.logprobs else None,
                    top_logprobs=tops[i] if request.params.top_logprobs else None,
                    finish_reason=delta.finish_reason,
                    matched_stop=delta.matched_stop,
                    seed=delta.seed,
                    spec=delta.spec,
                    group=group,
                    weight_version=delta.weight_version,
                    length_class=delta.length_class,
                )
        return [result for result in results if result is not None]

    async def stream(self, request: GenerateRequest) -> AsyncIterator[SampleDelta]:
        if request.request_id in self._live:
            raise InvalidRequest(f"request id {request.request_id!r} is already running")
        prompt = request.prompt_token_ids
        if min(prompt) < 0 or max(prompt) >= VOCAB_SIZE:
            raise InvalidRequest(f"prompt token ids must be in [0, {VOCAB_SIZE})", "prompt")
        live = self._live[request.request_id] = _Live(asyncio.Event())
        history = self.history
        started: list[Hashable] = []
        try:
            await self._hold(live, queued=True)
            group = group_of(request.group, prompt)
            await self.store.ensure_group(group)
            lengths = history.recent_lengths(group)
            klass = length_class(float(np.median(lengths)) if lengths else None)
            version = self._version
            params = request.params
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            plans = []
            for i in range(params.n):
                plans.append(self._plan(request, seed, i))
                # Planning a long sample takes a while: the loop serves others in between.
                await asyncio.sleep(0)
            for plan in plans:
                history.start_request(plan.key, group, prompt[-_PROMPT_TAIL:])
                started.append(plan.key)
            running = plans
            while running:
                if live.aborted.is_set():
                    for plan in running:
                        plan.finish_reason, plan.matched_stop = "abort", None
                        yield self._delta(plan, plan.pos, params, version, klass, done=True)
                    break
                still = []
                for plan in running:
                    start = plan.pos
                    self._forward(plan)
                    history.extend_request(plan.key, plan.tokens[start : plan.pos])
                    done = plan.pos == len(plan.tokens)
                    if done:
                        self.store.record(group, prompt, plan.tokens.tolist(), version)
                    else:
                        still.append(plan)
                    yield self._delta(plan, start, params, version, klass, done=done)
                running = still
                if running:
                    # Between passes the loop serves others (/health never waits on this).
                    await asyncio.sleep(self._delay)
                    await self._hold(live, queued=False)
        finally:
            for key in started:
                history.stop_request(key)
            del self._live[request.request_id]

    async def _hold(self, live: _Live, queued: bool) -> None:
        """Wait while paused (or until aborted)."""
        if self._gate.is_set() or live.aborted.is_set():
            return
        live.queued = queued
        waits = [
            asyncio.ensure_future(self._gate.wait()),
            asyncio.ensure_future(live.aborted.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            live.queued = False
            for wait in waits:
                wait.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await wait

    def _forward(self, plan: _Plan) -> None:
        """One target forward pass: verify the history's draft, emit accepted + 1 tokens."""
        start = plan.pos
        remaining = len(plan.tokens) - start
        accepted = 0
        if self._budget and remaining > 1:
            draft = self.history.speculate(plan.key, min(self._budget, remaining - 1))
            target = plan.tokens[start + 1 : start + 1 + len(draft)].tolist()
            target.insert(0, int(plan.tokens[start]))
            # The draft proposes what follows the context; walk it (a chain or a tree) along
            # the target's tokens, descending into a child only if it matches.
            node = -1
            for i, (token, parent) in enumerate(zip(draft.token_ids, draft.parents, strict=True)):
                if accepted == len(target) - 1:
                    break
                if parent == node and token == target[accepted]:
                    node, accepted = i, accepted + 1
            plan.spec.drafted_tokens += len(draft)
            plan.spec.accepted_tokens += accepted
        plan.spec.forward_passes += 1
        plan.pos = min(len(plan.tokens), start + accepted + 1)

    def _delta(
        self,
        plan: _Plan,
        start: int,
        params: SamplingParams,
        version: int,
        klass: str,
        done: bool,
    ) -> SampleDelta:
        end = plan.pos
        text_start = int(plan.text_ends[start - 1]) if start else 0
        text_end = int(plan.text_ends[end - 1]) if end else 0
        token_ids = plan.tokens[start:end].tolist()
        logprobs = plan.logprobs[start:end].tolist() if params.logprobs else None
        top = None
        if params.top_logprobs and logprobs is not None:
            top = [
                _top_logprobs(t, lp, params.top_logprobs)
                for t, lp in zip(token_ids, logprobs, strict=True)
            ]
        return SampleDelta(
            index=plan.index,
            token_ids=token_ids,
            text=plan.text[text_start:text_end],
            logprobs=logprobs,
            top_logprobs=top,
            finish_reason=plan.finish_reason if done else None,
            matched_stop=plan.matched_stop if done else None,
            seed=plan.seed,
            spec=SpecCounters(
                plan.spec.forward_passes, plan.spec.drafted_tokens, plan.spec.accepted_tokens
            ),
            weight_version=version,
            length_class=klass,
        )

    # -- the deterministic "model" ------------------------------------------------------

    def _plan(self, request: GenerateRequest, seed: int, index: int) -> _Plan:
        params = request.params
        h = _prompt_hash(request.prompt_token_ids)
        natural = self._natural_length(h, seed, index, params.temperature)
        draws = params.max_tokens if params.ignore_eos else min(params.max_tokens, natural)
        base = self._base(h, draws)
        u = np.random.default_rng([seed, index, h, 0]).random(draws)
        alt = (np.random.default_rng([seed, index, h, 1]).random(draws) * len(_ALPHABET)).astype(
            np.int64
        )
        lp_u = np.random.default_rng([seed, index, h, 2]).random(draws + 1)
        temperature = 0.0 if params.top_k == 1 else params.temperature
        deviate = u < _DEVIATION * temperature * params.top_p
        tokens = np.where(deviate, _ALPHABET[alt], base[:draws]).astype(np.int32)
        if not params.ignore_eos and draws == natural:
            tokens = np.append(tokens, np.int32(EOS))
        logprobs = np.log(0.2 + 0.8 * lp_u[: len(tokens)])

        finish: FinishReason = "length"
        matched: int | str | None = None
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.add(EOS)
        if stop_ids:
            hits = np.flatnonzero(np.isin(tokens, np.fromiter(stop_ids, dtype=np.int32)))
            if hits.size:
                cut = int(hits[0]) + 1
                tokens, finish, matched = tokens[:cut], "stop", int(tokens[cut - 1])
        if len(tokens) > params.max_tokens:
            tokens, finish, matched = tokens[: params.max_tokens], "length", None

        skip = params.skip_special_tokens
        text = self.detokenize(tokens.tolist(), skip)
        chars = np.fromiter(
            (1 if t < 256 else (0 if skip else (3 if t == BOS else 4)) for t in tokens.tolist()),
            dtype=np.int64,
            count=len(tokens),
        )
        text_ends = np.cumsum(chars)
        stop_at = _first_stop(text, params.stop)
        if stop_at is not None:
            begin, end, stop = stop_at
            # Output chars map one to one onto tokens before any special token.
            cut = int(np.searchsorted(text_ends, end)) + 1
            tokens, finish, matched = tokens[:cut], "stop", stop
            text = text[:end] if params.no_stop_trim else text[:begin]
        elif finish == "stop" and not params.no_stop_trim and isinstance(matched, int):
            text = self.detokenize(tokens[:-1].tolist(), skip)
        text_ends = np.minimum(text_ends[: len(tokens)], len(text))
        return _Plan(
            index=index,
            seed=seed,
            tokens=tokens,
            logprobs=logprobs[: len(tokens)],
            finish_reason=finish,
            matched_stop=matched,
            text=text,
            text_ends=text_ends,
            key=(request.request_id, index),
        )

    @staticmethod
    def _natural_length(h: int, seed: int, index: int, temperature: float) -> int:
        base_length = 16 + h % 240
        if temperature == 0:
            return base_length
        jitter = np.random.default_rng([seed, index, h, 3]).standard_normal()
        return max(1, round(base_length * float(np.exp(0.5 * temperature * jitter))))

    def _base(self, h: int, length: int) -> npt.NDArray[np.int32]:
        base = self._bases.get(h)
        if base is None or len(base) < length:
            size = max(length, 512)
            draws = np.random.default_rng([h, 7]).random(size)
            base = _ALPHABET[(draws * len(_ALPHABET)).astype(np.int64)]
            self._bases[h] = base
            if len(self._bases) > _BASE_CACHE:
                self._bases.popitem(last=False)
        self._bases.move_to_end(h)
        return base


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, int, str] | None:
    """(begin, end, stop) of the stop string occurrence that ends first."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        begin = text.find(stop)
        if begin >= 0 and (best is None or begin + len(stop) < best[1]):
            best = (begin, begin + len(stop), stop)
    return best


def _top_logprobs(token: int, logprob: float, k: int) -> dict[int, float]:
    top = {token: logprob}
    offset = token - 97 if 97 <= token < 123 else 0
    for j in range(1, k):
        top[97 + (offset + j) % 26] = logprob - 1.0 - 0.5 * j
    return top
