from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import oracle
from drafter.cost import CostCurve, CostModel
from drafter.simulator import baseline_time
from drafter.traces import TraceRecord, write_trace


def _runs(
    earlier: list[list[int]], prompt: list[int], output: list[int], max_draft: int, context: int
) -> list[int]:
    """The oracle's runs for one rollout alone in its batch, of group "g"."""
    record = TraceRecord("g", 1, tuple(prompt), tuple(output))
    return oracle.oracle_batch([record], {"g": earlier}, max_draft, context)[0]


def test_a_rollout_seen_before_is_drafted_in_full_runs() -> None:
    prompt, output = [7, 8], list(range(100, 140))
    runs = _runs([[*prompt, *output]], prompt, output, max_draft=16, context=2)
    # 16 + 1 tokens per step, the last step's run limited by the tokens left.
    assert runs == [16, 16, 5]


def test_nothing_to_copy_means_one_token_per_step() -> None:
    assert _runs([[1, 2, 3]], [4], [10, 11, 12, 13], max_draft=16, context=1) == [0, 0, 0, 0]


def test_runs_come_from_the_rollouts_own_past_only() -> None:
    # At position 4 the anchor [1] was followed by 2, 3, 1 earlier in the output; position 8
    # is the last token, with nothing left to draft.
    output = [1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert _runs([], [9], output, max_draft=16, context=1) == [0, 0, 0, 0, 3, 0]
    assert _runs([], [9], output, max_draft=2, context=1) == [0, 0, 0, 0, 2, 1]


def test_the_context_must_match_too() -> None:
    # The earlier sequence holds 5, 6 after 4 but not after 3.
    assert _runs([[4, 5, 6]], [3], [5, 6], max_draft=4, context=1) == [0, 0]
    assert _runs([[4, 5, 6]], [4], [5, 6], max_draft=4, context=1) == [1]


def test_a_finished_sibling_joins_the_history_of_its_group_only() -> None:
    # The short rollout finishes at step 1, so at step 3 the long one (anchor 1) may copy the
    # 5 that followed 1 in it; alone, or in another group, nothing is ever copyable.
    short = TraceRecord("g", 0, (1,), (5,))
    long = TraceRecord("g", 0, (1,), (9, 1, 5, 3))
    other = TraceRecord("h", 0, (1,), (9, 1, 5, 3))
    runs = oracle.oracle_batch([short, long, other], {}, max_draft=8, context=1)
    assert runs == [[0], [0, 0, 1], [0, 0, 0, 0]]
    assert oracle.oracle_batch([long], {}, max_draft=8, context=1) == [[0, 0, 0, 0]]
    # With other groups visible, h's rollout may copy g's finished one too.
    everywhere = oracle.oracle_batch([short, long, other], {}, 8, 1, other_groups=True)
    assert everywhere == [[0], [0, 0, 1], [0, 0, 1]]


def test_live_siblings_show_their_outputs_as_of_the_steps_start() -> None:
    # At step 2 the lagging rollout (anchor 7) may copy the 8 that followed 7 in its running
    # sibling; 9 came later (not shown yet). Without live siblings nothing is copyable.
    lead = TraceRecord("g", 0, (1,), (7, 8, 9, 4))
    lag = TraceRecord("g", 0, (1,), (2, 7, 8, 9, 4))
    with_siblings = oracle.oracle_batch([lead, lag], {}, max_draft=8, context=1, live_siblings=True)
    assert with_siblings == [[0, 0, 0, 0], [0, 0, 1, 0]]
    alone = oracle.oracle_batch([lead, lag], {}, max_draft=8, context=1)
    assert alone == [[0, 0, 0, 0], [0, 0, 0, 0, 0]]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        _runs([], [1], [2], max_draft=-1, context=1)
    with pytest.raises(ValueError):
        _runs([], [1], [2], max_draft=4, context=0)


def _repeated_trace() -> list[TraceRecord]:
    outputs = {"a": tuple(range(100, 130)), "b": tuple(range(200, 210))}
    return [
        TraceRecord(group, epoch, (1, 2), output)
        for epoch in (0, 1)
        for group, output in outputs.items()
    ]


def test_epochs_report_steps_and_modeled_makespan() -> None:
    cost = CostModel(0.01, 0.001)
    first, second = oracle.oracle_epochs(_repeated_trace(), max_draft=8, context=2, cost=cost)
    # Epoch 0 has no history and distinct tokens: no drafts, as slow as no speculation.
    assert first["steps"] == first["longest"] == 30
    assert first["steps_ratio"] == 1.0
    assert first["makespan_ratio"] == pytest.approx(1.0)
    # Epoch 1 repeats epoch 0: group a takes 9-token steps (30 = 9 + 9 + 9 + 3) and b 10 = 9 + 1.
    assert second["steps"] == 4
    assert second["tokens_per_forward"] == pytest.approx(40 / 6)
    processed = (4 + 26) + (2 + 8)  # forwards plus accepted drafts, both rollouts
    expected = (0.01 * 4 + 0.001 * processed) / baseline_time([30, 10], cost)
    assert second["makespan_ratio"] == pytest.approx(expected)


def test_a_cost_curve_prices_each_oracle_step_for_its_batch() -> None:
    cost = CostModel(0.01, 0.001)
    curve = CostCurve(((1, CostModel(0.02, 0.004)), (2, CostModel(0.01, 0.001))))
    _, second = oracle.oracle_epochs(_repeated_trace(), 8, 2, cost, curve=curve)
    # Epoch 1 as above: a feeds 9, 9, 9 and 3 tokens, b 9 and 1, so steps 1 and 2 run two
    # rows (18 and 10 tokens), steps 3 and 4 one (9 and 3).
    two, one = curve.at(2), curve.at(1)
    modeled = two.step_time(18) + two.step_time(10) + one.step_time(9) + one.step_time(3)
    assert second["makespan_ratio"] == pytest.approx(modeled / baseline_time([30, 10], cost, curve))


def test_main_prints_a_table_and_writes_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trace, out = tmp_path / "t.jsonl", tmp_path / "oracle.json"
    write_trace(trace, _repeated_trace())
    monkeypatch.setattr(sys, "argv", ["oracle", "--trace", str(trace), "--json", str(out)])
    oracle.main()
    assert "| 1 | 30 | 2 | 0.067 |" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert [e["steps"] for e in payload["epochs"]] == [30, 2]
    assert payload["steps_ratio"] == pytest.approx(32 / 60)
