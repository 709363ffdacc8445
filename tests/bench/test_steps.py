from __future__ import annotations

from bench.steps import measure
from service.engine.models import tiny_random_model
from service.engine.runner import Runner


def test_measure_times_a_step_and_rolls_it_back() -> None:
    runner = Runner(tiny_random_model(), slots=4, max_len=32)
    runner.forward([0], [list(range(1, 9))], [1])
    for slot in range(1, 4):
        runner.copy_prefix(0, slot, 8)
    forward, sampling = measure(runner, rows=3, per_row=5, context=8, repeats=2)
    assert forward > 0 and sampling > 0
    assert runner.lengths == [8, 8, 8, 8]  # every timed step was rolled back
