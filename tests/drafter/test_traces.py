from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drafter.traces import (
    EOS,
    SyntheticShape,
    TraceRecord,
    parse_record,
    read_trace,
    synthetic_trace,
    write_trace,
)


def test_records_round_trip_through_a_file(tmp_path: Path) -> None:
    records = [
        TraceRecord("g", 0, (1, 2, 3), (4, 5)),
        TraceRecord("h", 3, (), (0, 2**31 - 1), synthetic=True),
    ]
    path = tmp_path / "trace.jsonl"
    assert write_trace(path, records) == 2
    assert read_trace(path) == records
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"group": "g", "epoch": 0, "prompt": [1, 2, 3], "output": [4, 5]}
    assert json.loads(lines[1])["synthetic"] is True


def test_blank_lines_and_extra_keys_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    line = {"group": "g", "epoch": 1, "prompt": [1], "output": [2], "reward": 1.0}
    path.write_text("\n" + json.dumps(line) + "\n   \n")
    assert read_trace(path) == [TraceRecord("g", 1, (1,), (2,))]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"group": "g", "epoch": 0, "prompt": []}', "missing output"),
        ('{"group": "", "epoch": 0, "prompt": [], "output": [1]}', "group"),
        ('{"group": 3, "epoch": 0, "prompt": [], "output": [1]}', "group"),
        ('{"group": "g", "epoch": -1, "prompt": [], "output": [1]}', "epoch"),
        ('{"group": "g", "epoch": true, "prompt": [], "output": [1]}', "epoch"),
        ('{"group": "g", "epoch": "0", "prompt": [], "output": [1]}', "epoch"),
        ('{"group": "g", "epoch": 0, "prompt": "abc", "output": [1]}', "prompt"),
        ('{"group": "g", "epoch": 0, "prompt": [1.5], "output": [1]}', "prompt"),
        ('{"group": "g", "epoch": 0, "prompt": [], "output": [-1]}', "output"),
        ('{"group": "g", "epoch": 0, "prompt": [], "output": [2147483648]}', "output"),
        ('{"group": "g", "epoch": 0, "prompt": [], "output": [true]}', "output"),
        ('{"group": "g", "epoch": 0, "prompt": [], "output": []}', "at least one token"),
        ('{"group": "g", "epoch": 0, "prompt": [], "output": [1], "synthetic": 1}', "synthetic"),
    ],
)
def test_bad_lines_are_reported_with_their_line_number(
    tmp_path: Path, line: str, problem: str
) -> None:
    good = json.dumps({"group": "g", "epoch": 0, "prompt": [], "output": [1]})
    path = tmp_path / "trace.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=f"trace.jsonl:3: .*{problem}"):
        read_trace(path)
    with pytest.raises(ValueError, match=problem):
        parse_record(line)


def test_a_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_trace(tmp_path / "absent.jsonl")


def test_synthetic_trace_defaults_and_labels() -> None:
    trace = synthetic_trace()
    assert len(trace) == 8 * 8 * 6
    assert all(record.synthetic for record in trace)
    assert all(record.group.startswith("synthetic-") for record in trace)
    assert [record.epoch for record in trace] == sorted(record.epoch for record in trace)
    shape = SyntheticShape()
    assert all(len(record.output) <= shape.max_tokens for record in trace)
    assert sum(record.output[-1] == EOS for record in trace) > 0.9 * len(trace)
    for group in {record.group for record in trace}:
        prompts = {record.prompt for record in trace if record.group == group}
        assert len(prompts) == 1  # one prompt per group, every epoch


def test_synthetic_trace_is_deterministic_per_seed() -> None:
    assert synthetic_trace(2, 3, 2, seed=5) == synthetic_trace(2, 3, 2, seed=5)
    assert synthetic_trace(2, 3, 2, seed=5) != synthetic_trace(2, 3, 2, seed=6)


def test_synthetic_lengths_are_long_tailed() -> None:
    lengths = np.asarray([len(record.output) for record in synthetic_trace(seed=1)])
    median = float(np.median(lengths))
    assert float(np.quantile(lengths, 0.99)) > 3 * median
    assert float(np.mean(lengths)) > median  # right-skewed


def _ngrams(tokens: tuple[int, ...], n: int = 8) -> set[tuple[int, ...]]:
    return {tokens[i : i + n] for i in range(len(tokens) - n + 1)}


def _overlap(later: list[TraceRecord], earlier: list[TraceRecord]) -> float:
    """Share of the later rollouts' 8-grams that the earlier rollouts contain."""
    seen = set().union(*(_ngrams(record.output) for record in earlier))
    grams = [gram for record in later for gram in _ngrams(record.output)]
    return sum(gram in seen for gram in grams) / len(grams)


def test_synthetic_groups_share_structure_that_drifts_over_epochs() -> None:
    trace = synthetic_trace(groups=3, samples=6, epochs=8, seed=2)

    def rollouts(group: str, epoch: int) -> list[TraceRecord]:
        return [r for r in trace if r.group == group and r.epoch == epoch]

    groups = sorted({record.group for record in trace})
    for group in groups:
        next_epoch = _overlap(rollouts(group, 1), rollouts(group, 0))
        far_epoch = _overlap(rollouts(group, 7), rollouts(group, 0))
        assert next_epoch > 0.3  # a group's rollouts repeat its solution paths
        assert far_epoch < next_epoch  # ...which drift away epoch by epoch
    assert _overlap(rollouts(groups[0], 1), rollouts(groups[1], 0)) < 0.01


def test_synthetic_trace_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        synthetic_trace(groups=0)
    with pytest.raises(ValueError):
        synthetic_trace(epochs=0)


@pytest.mark.parametrize(
    "knobs",
    [
        {"vocab_size": 4},
        {"phrase_tokens": (5, 5)},
        {"template_units": (0, 3)},
        {"phrases": 1},
        {"templates": 0},
        {"median_units": 0.5},
        {"max_tokens": 0},
        {"switch": 0.6, "skip": 0.6},
        {"token_noise": 1.5},
        {"group_spread": -1.0},
    ],
)
def test_synthetic_shape_checks_itself(knobs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SyntheticShape(**knobs)  # type: ignore[arg-type]


def test_synthetic_shape_cut_at_max_tokens() -> None:
    shape = SyntheticShape(max_tokens=32, median_units=40)
    trace = synthetic_trace(groups=2, samples=4, epochs=1, shape=shape)
    assert all(len(record.output) <= 32 for record in trace)
    assert any(len(record.output) == 32 and record.output[-1] != EOS for record in trace)
