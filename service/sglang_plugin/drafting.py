"""The speculation core driven by SGLang's scheduler: its requests in, our drafts out.

BatchDrafter holds one Speculator (drafter/speculator.py) and the SGLang requests it tracks,
keyed by rid. The worker (worker.py) calls it only at the scheduler's deterministic events,
so every tensor-parallel rank, which runs the same batches in the same order, holds the same
history and drafts the same tokens:
- see(reqs) for every batch the worker runs (prefill included): a request seen for the first
  time starts; a tracked one that has left the batches and finished is finished here, which
  is how requests that end during prefill (SGLang never tells the spec worker) still reach
  the history;
- drafts(reqs, spliced, width) once per decode step: first each request's newly committed
  tokens extend it (output_ids, plus last round's accepted tokens in overlap mode, which
  output_ids does not hold yet), then the policy's budgets for the live batch, capped at
  width - 1 and at the tokens the request may still generate, give the drafts;
- finished(rid) from NGRAMWorker.note_request_finished, once the output is final.
A request ends naturally (it joins the history and the publisher) unless it was aborted.

Requests are duck-typed (rid, origin_input_ids_unpadded, output_ids, output_ids_through_stop,
sampling_params.custom_params / max_new_tokens, finished(), finished_reason): no sglang import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from drafter.draft import NO_DRAFT, Draft
from drafter.groups import group_of
from drafter.speculator import SpecRequest, Speculator

GROUP_PARAM = "prompt_group"  # the custom_params key our gateway sets


def request_group(req: Any) -> str:
    """The prompt group of an SGLang request: custom_params["prompt_group"] when the client
    (our gateway) sent one, else the hash of its prompt token ids."""
    params = getattr(req.sampling_params, "custom_params", None)
    explicit = params.get(GROUP_PARAM) if isinstance(params, dict) else None
    if not isinstance(explicit, str):
        explicit = None
    return group_of(explicit, list(req.origin_input_ids_unpadded))


@dataclass(slots=True, eq=False)
class Tracked:
    req: Any  # the SGLang Req
    spec: SpecRequest
    drafted: int = 0  # draft tokens it was offered at its last decode step


class BatchDrafter:
    def __init__(
        self, speculator: Speculator, is_abort: Callable[[Any], bool] | None = None
    ) -> None:
        """`is_abort(finished_reason)` tells an aborted request from one that ended by itself
        (default: the reason's class is named FINISH_ABORT, as in sglang 0.5.23)."""
        self.speculator = speculator
        self._is_abort = is_abort or (lambda reason: type(reason).__name__ == "FINISH_ABORT")
        self._tracked: dict[str, Tracked] = {}

    @property
    def tracked(self) -> dict[str, Tracked]:
        return self._tracked

    def see(self, reqs: Sequence[Any]) -> None:
        """A batch is about to run: start the requests new to us, finish the tracked ones that
        finished outside it (the scheduler has already processed their last result)."""
        live = {req.rid for req in reqs}
        for rid, tracked in list(self._tracked.items()):
            if rid not in live and tracked.req.finished():
                self._finish(tracked)
        for req in reqs:
            if not req.finished():  # (overlap runs a finished request one step more)
                self._track(req)

    def finished(self, rid: str) -> None:
        """SGLang's note_request_finished: the request's output is final."""
        tracked = self._tracked.get(rid)
        if tracked is not None and tracked.req.finished():
            self._finish(tracked)

    def sweep(self) -> None:
        """Finish every tracked request that has finished (the scheduler is idle, e.g. before a
        cache flush)."""
        for tracked in list(self._tracked.values()):
            if tracked.req.finished():
                self._finish(tracked)

    def drafts(
        self, reqs: Sequence[Any], spliced: Sequence[Sequence[int]] | None, width: int
    ) -> tuple[list[Draft], list[int]]:
        """Drafts of at most width - 1 tokens for one decode step, and each request's root
        (its last committed token). spliced[i]: tokens request i committed that its output_ids
        lacks yet (overlap scheduling), None when output_ids is complete."""
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        live: list[int] = []  # the rows that draft
        specs: list[SpecRequest] = []
        caps: list[int] = []
        roots: list[int] = []
        for i, req in enumerate(reqs):
            output = req.output_ids
            extra = spliced[i] if spliced is not None else ()
            if extra:
                roots.append(int(extra[-1]))
            else:
                roots.append(int(output[-1] if output else req.origin_input_ids_unpadded[-1]))
            if req.finished():  # overlap scheduling runs it one step past its end: no draft
                continue
            tracked = self._track(req)
            self._catch_up(tracked, output, extra)
            live.append(i)
            specs.append(tracked.spec)
            generated = len(output) + len(extra)
            caps.append(max(0, min(width - 1, _remaining(req, generated) - 1)))
        drafts = [NO_DRAFT] * len(reqs)
        for i, spec, draft in zip(live, specs, self.speculator.drafts(specs, caps), strict=True):
            drafts[i] = draft
            self._tracked[spec.request_id].drafted = len(draft)
        return drafts, roots

    def on_new_version(self) -> None:
        """The served weights changed: rollouts move to the next policy version."""
        history = self.speculator.history
        history.set_version(history.version + 1)

    # -- internals ----------------------------------------------------------------------

    def _track(self, req: Any) -> Tracked:
        tracked = self._tracked.get(req.rid)
        if tracked is not None and tracked.req is not req:  # a new request reusing the rid
            self._end(tracked, natural=False)
            tracked = None
        if tracked is None:
            spec = self.speculator.start(
                req.rid, request_group(req), list(req.origin_input_ids_unpadded)
            )
            tracked = self._tracked[req.rid] = Tracked(req, spec)
        return tracked

    def _catch_up(self, tracked: Tracked, output: Sequence[int], extra: Sequence[int] = ()) -> None:
        """Extend the request by the tokens committed since its last step: those of
        output + extra past what it holds (only the new tail is read: a step costs nothing
        in the length of the rollout)."""
        known = len(tracked.spec.output)
        if len(output) + len(extra) <= known:
            return
        if known < len(output):
            appended = [*output[known:], *extra]
        else:
            appended = list(extra[known - len(output) :])
        # One step appends its accepted draft tokens and the target's own next token.
        accepted = min(tracked.drafted, len(appended) - 1)
        self.speculator.extend(tracked.spec, appended, tracked.drafted, accepted)
        tracked.drafted = 0

    def _finish(self, tracked: Tracked) -> None:
        req = tracked.req
        natural = not self._is_abort(req.finished_reason)
        if natural:
            final = list(req.output_ids_through_stop)
            spec = tracked.spec
            if spec.output == final[: len(spec.output)]:
                self._catch_up(tracked, final)
            else:
                # Overlap scheduling ran the request one step past its stop: what it
                # committed then was cut by the scheduler. The rollout is the final output.
                spec.output = final
        self._end(tracked, natural)

    def _end(self, tracked: Tracked, natural: bool) -> None:
        del self._tracked[tracked.spec.request_id]
        self.speculator.finish(tracked.spec, natural)


def _remaining(req: Any, generated: int) -> int:
    """Tokens the request may still generate (its max_new_tokens less what it has)."""
    limit = getattr(req.sampling_params, "max_new_tokens", None)
    if limit is None:
        return 1 << 30
    return int(limit) - generated
