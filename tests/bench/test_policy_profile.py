from __future__ import annotations

import pytest

from bench.policy_profile import TARGETS, format_timings, timers
from drafter import DrafterConfig, RolloutHistory
from drafter.acceptance import DraftCalibrator
from drafter.cost import SMOLLM2_CPU
from drafter.das import DasPolicy
from drafter.speculator import Speculator

PROMPT = [1, 2, 3]
ANSWER = [10, 11, 12, 13, 14, 15, 16, 17]


def _originals() -> dict[str, object]:
    return {
        "drafts": Speculator.__dict__["drafts"],
        "budgets": DasPolicy.__dict__["budgets"],
        "tick": DraftCalibrator.__dict__["tick"],
    }


def test_every_call_of_a_das_step_is_timed_and_the_originals_come_back() -> None:
    before = _originals()
    history = RolloutHistory(DrafterConfig(max_depth=8))
    history.add_rollout("g", ANSWER, version=0, prompt=PROMPT)
    core = Speculator(history, DasPolicy(SMOLLM2_CPU))
    requests = [core.start("r", "g", PROMPT, sample_index=i) for i in range(3)]
    with timers() as timings:
        assert Speculator.__dict__["drafts"] is not before["drafts"]
        for _ in range(4):
            drafts = core.drafts(requests, [16] * 3)
            core.extend_batch(requests, [[10]] * 3, [len(d) for d in drafts], [0] * 3)
        core.finish(requests[0], natural=True)
    assert set(timings) == {f"{owner or module}.{name}" for module, owner, name in TARGETS}
    assert timings["Speculator.drafts"].calls == 4
    assert timings["DasPolicy.budgets"].calls == 4
    assert timings["DraftCalibrator.tick"].calls == 4  # one verify step each
    assert timings["Speculator.extend_batch"].calls == 4
    assert timings["Speculator.finish"].calls == 1
    # A call inside another is inside its time.
    assert timings["DasPolicy.budgets"].seconds <= timings["Speculator.drafts"].seconds
    assert _originals() == before
    assert "Speculator.drafts" in format_timings(timings)


def test_the_originals_come_back_when_the_run_fails() -> None:
    before = _originals()
    with pytest.raises(RuntimeError), timers():
        raise RuntimeError("the run failed")
    assert _originals() == before


def test_an_inherited_method_is_timed_on_the_class_named_then_removed_from_it() -> None:
    class Base:
        def step(self) -> int:
            return 7

    class Child(Base):
        pass

    import sys
    import types

    module = types.ModuleType("profiled_for_test")
    module.Child = Child  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    try:
        with timers([(module.__name__, "Child", "step")]) as timings:
            assert Child().step() == 7 and Base().step() == 7
        assert timings["Child.step"].calls == 1
        assert "step" not in vars(Child) and Child().step() == 7
    finally:
        del sys.modules[module.__name__]
