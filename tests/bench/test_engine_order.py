from __future__ import annotations

import json
from pathlib import Path

from bench.engine_order import main
from service.engine.engine import STEP_PHASES


def test_each_engine_is_timed_by_phase_in_the_order_made(tmp_path: Path) -> None:
    out = tmp_path / "order.json"
    main(
        [
            "--model",
            "tiny-random",
            "--modes",
            "none,fixed:2,none",
            "--steps",
            "3",
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert [(e["made"], e["mode"]) for e in data["engines"]] == [
        (0, "none"),
        (1, "fixed:2"),
        (2, "none"),
    ]
    for engine in data["engines"]:
        assert tuple(engine["ms_per_step"]) == STEP_PHASES
        assert engine["ms_per_step"]["forward"] > 0
    assert data["engines"][0]["drafted"] == data["engines"][2]["drafted"] == 0


def test_fused_weights_can_be_shared_and_the_json_says_so(
    tmp_path: Path,
) -> None:
    out = tmp_path / "order.json"
    args = ["--model", "tiny-random", "--modes", "none,none", "--steps", "3"]
    main([*args, "--share-fused-weights", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["share_fused_weights"] is True
    assert [e["mode"] for e in data["engines"]] == ["none", "none"]
