"""EngineDrafter, the engine-core side of the vLLM backend, driven by hand-made batch rows
(no vLLM): requests start from the rows' extra_args, drafts come from the group's history,
only settled natural ends enter it, and the calibrator fits vLLM's step times."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from drafter.draft import HISTORY
from service.vllm_backend.config import DasVllmOptions
from service.vllm_backend.drafting import (
    GROUP_ARG,
    ID_ARG,
    SAMPLE_ARG,
    Calibrator,
    EngineDrafter,
    Row,
)

PROMPT = [5, 6, 7]
ANSWER = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]


def row(req_id: str, sampled: Sequence[int], das_id: str, cap: int = 8, group: str = "g") -> Row:
    args = {GROUP_ARG: group, SAMPLE_ARG: 0, ID_ARG: das_id}
    return Row(req_id, list(sampled), lambda: PROMPT, args, cap)


def run_answer(drafter: EngineDrafter, req_id: str, das_id: str) -> list[list[int]]:
    """Feed ANSWER as the target's tokens, accepting what matches; the drafts proposed."""
    proposed: list[list[int]] = []
    pos = 0
    draft: list[int] = []
    while pos < len(ANSWER):
        accepted = 0
        for token in draft:
            if pos + accepted < len(ANSWER) - 1 and ANSWER[pos + accepted] == token:
                accepted += 1
            else:
                break
        gained = ANSWER[pos : pos + accepted + 1]
        pos += len(gained)
        (draft,) = drafter.propose([row(req_id, gained, das_id)])
        proposed.append(draft)
    return proposed


def fixed() -> EngineDrafter:
    return EngineDrafter(DasVllmOptions(policy="fixed:8", cost_model="smollm2-cpu"))


def test_history_drafts_the_second_rollout_and_counts_it() -> None:
    drafter = fixed()
    run_answer(drafter, "vllm-a", "a#0")
    drafter.removed("vllm-a")
    answer = drafter.settle([("a#0", True, len(ANSWER))])
    assert answer["pending"] == []
    assert answer["rollouts"] == [("g", PROMPT, ANSWER, 0)]
    forwards, _, accepted, _, _, _ = answer["counters"]["a#0"]
    assert forwards == len(ANSWER) and accepted == 0  # nothing to draft from yet

    proposed = run_answer(drafter, "vllm-b", "b#0")
    drafter.removed("vllm-b")
    counters = drafter.settle([("b#0", True, len(ANSWER))])["counters"]["b#0"]
    assert proposed[0] == ANSWER[1:9]  # the first rollout, drafted after its first token
    assert counters[2] > 0 and counters[0] < len(ANSWER)
    # Its drafts came from the first rollout: all counted under the group's history.
    assert counters[4] == {HISTORY: counters[1]} and counters[5] == {HISTORY: counters[2]}


def test_an_aborted_request_never_enters_the_history() -> None:
    drafter = fixed()
    run_answer(drafter, "vllm-a", "a#0")
    drafter.removed("vllm-a")
    answer = drafter.settle([("a#0", False, len(ANSWER))])
    assert answer["rollouts"] == [] and "a#0" in answer["counters"]
    assert drafter.stats()["history_groups"] == 0


def test_settle_before_removal_and_tokens_past_a_stop() -> None:
    drafter = fixed()
    run_answer(drafter, "vllm-a", "a#0")
    # The front end saw the end first (vLLM removes the request with its next step) and cut
    # the output at a stop string 5 tokens in.
    answer = drafter.settle([("a#0", True, 5)])
    assert answer["rollouts"] == [("g", PROMPT, ANSWER[:5], 0)]
    assert drafter.propose([row("vllm-a", [99], "a#0")]) == [[]]  # never drafted for again
    drafter.removed("vllm-a")
    assert drafter.stats()["live_requests"] == 0
    assert drafter.settle([("zz#0", True, 3)])["pending"] == ["zz#0"]  # not seen here


def test_prefilling_rows_and_caps_get_no_draft() -> None:
    drafter = fixed()
    run_answer(drafter, "vllm-a", "a#0")
    drafter.removed("vllm-a")
    drafter.settle([("a#0", True, len(ANSWER))])
    rows = [row("vllm-b", [], "b#0"), row("vllm-c", ANSWER[:1], "c#0", cap=0)]
    assert drafter.propose(rows) == [[], []]
    assert drafter.propose([row("vllm-d", ANSWER[:1], "d#0", cap=3)]) == [ANSWER[1:4]]


def test_calibration_drafts_nothing_until_fitted() -> None:
    drafter = EngineDrafter(DasVllmOptions(policy="das", calibration_steps=8))
    assert drafter.calibrating and drafter.cost is None
    run_answer(drafter, "vllm-a", "a#0")
    drafter.removed("vllm-a")
    drafter.settle([("a#0", True, len(ANSWER))])
    assert run_answer(drafter, "vllm-b", "b#0") == [[]] * len(ANSWER)
    calibrator = Calibrator(steps=8, skip=0)
    fit = None
    for n in (1, 8, 16, 32, 64, 128, 1, 64):
        fit = calibrator.add(n, 0.05 + 0.001 * n)
    assert fit is not None
    assert fit.c_base == pytest.approx(0.05) and fit.c_tok == pytest.approx(0.001)


def timed_step(drafter: EngineDrafter, tokens: int, seconds: float, prefill: bool = False) -> None:
    """A step of `tokens` scheduled tokens that took `seconds`, as the runner hooks time it."""
    drafter.step_started()
    drafter._step_started = time.perf_counter() - seconds
    drafter.step_timed(tokens, prefill=prefill)


def test_cost_model_refit_on_decode_steps_keeps_what_the_policy_learned() -> None:
    """After the first fit, decode steps refit the cost model every refit_every steps
    (prefill steps are left out); the policy is repriced, not rebuilt."""
    drafter = EngineDrafter(DasVllmOptions(policy="das", calibration_steps=8))
    for n in (0, 0, 0, 0, 1, 8, 16, 32, 64, 128, 1, 64):  # 4 warm-up steps, then the fit
        timed_step(drafter, max(n, 1), 0.05 + 0.001 * n)
    assert not drafter.calibrating and drafter.refits == 0
    policy = drafter.speculator.policy
    assert policy.cost is not None and policy.cost.c_tok == pytest.approx(0.001, rel=0.05)
    policy.observe_finished("g", 40)
    for i in range(256):  # verify steps: c_base 0.04, c_tok 0.005, and big cheap prefills
        tokens = 32 + 8 * (i % 8)
        timed_step(drafter, tokens, 0.04 + 0.005 * tokens)
        timed_step(drafter, 4096, 0.5, prefill=True)
    assert drafter.refits > 0 and drafter.speculator.policy is policy
    assert policy.cost.c_base == pytest.approx(0.04, abs=2e-3)
    assert policy.cost.c_tok == pytest.approx(0.005, rel=0.05)
    assert drafter.stats()["cost_refits"] == drafter.refits


def test_options_refuse_what_vllm_cannot_run() -> None:
    with pytest.raises(ValueError, match="none"):
        DasVllmOptions(policy="none")
    with pytest.raises(ValueError, match="cost model"):
        DasVllmOptions(cost_model="fast")
    options = DasVllmOptions(policy="fixed:4", max_draft=8)
    assert DasVllmOptions.from_dict({**options.to_dict(), "unknown": 1}) == options
    # The history knobs reach the engine core's history (here the threads growing its trees).
    threaded = EngineDrafter(
        DasVllmOptions(policy="fixed:4", cost_model="smollm2-cpu", extend_threads=0)
    )
    assert threaded.history.config.extend_threads == 0
