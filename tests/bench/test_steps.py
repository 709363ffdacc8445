from __future__ import annotations

import json
from pathlib import Path

from bench.steps import MATMUL_ROWS, main, measure
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


def test_matmul_mode_times_every_kernel_and_both_plans_at_each_row_count(
    tmp_path: Path,
) -> None:
    out = tmp_path / "matmul.json"
    args = ["--model", "tiny-random", "--matmul", "--repeats", "1", "--context", "4"]
    main([*args, "--json", str(out)])
    data = json.loads(out.read_text())
    first, last = data["small_matmul_rows"]
    assert 0 <= first <= last
    assert [cell["token_rows"] for cell in data["cells"]] == list(MATMUL_ROWS)
    for cell in data["cells"]:
        assert {"torch", "runner", "torch only"} <= set(cell["seconds"])
        assert all(seconds > 0 for seconds in cell["seconds"].values())
