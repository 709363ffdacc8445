"""Does an engine's step time depend on when it was made? Engines of the given modes (repeats
allowed) made in that order over one model, given the same requests (the default workload's
epoch 0), take turns step by step as `das bench rollout`'s modes do (each round starting with
the next engine); prints each engine's milliseconds per step by phase and writes JSON.

    python -m bench.engine_order [--model smollm2-135m] [--modes none,none,das]
                                 [--steps 250] [--temperature 1.0] [--share-fused-weights]
                                 [--json OUT]

Two engines of one mode should time alike; a gap between them is a bias of the rollout
benchmark, which makes its reference mode's engine first. --share-fused-weights gives every
runner the first runner's fused q/k/v and gate/up copies (each runner makes its own), to test
whether their placement in memory is the cause. No timing is asserted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.rollout import (
    RolloutConfig,
    build_workload,
    machine_info,
    mode_engine,
    model_vocab_size,
)
from drafter.cost import SMOLLM2_CPU
from service.engine.engine import STEP_PHASES
from service.engine.models import SMOLLM2, load_model

DEFAULT_JSON = Path(__file__).parent / "results" / "engine_order.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--modes", default="none,none,das", help="engines, in the order made")
    parser.add_argument("--steps", type=int, default=250, help="steps of each engine (at most)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--share-fused-weights", action="store_true", help="every runner uses the first's"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    config = RolloutConfig(model=args.model, temperature=args.temperature, cost="smollm2-cpu")
    model, tokenizer = load_model(config.model)
    workload = build_workload(config, tokenizer, model_vocab_size(model))
    engines = [mode_engine(config, mode, model, tokenizer, workload, SMOLLM2_CPU) for mode in modes]
    if args.share_fused_weights:
        for engine in engines[1:]:
            engine.runner.layers = engines[0].runner.layers
    for engine in engines:
        for request in workload.requests(0, config.seed):
            engine.add_request(request)
    for step in range(args.steps):
        first = step % len(engines)
        for engine in engines[first:] + engines[:first]:
            engine.step()
    rows = []
    print(
        f"{args.steps} steps each, temperature {args.temperature}, torch threads "
        f"{torch.get_num_threads()}; ms per step by phase"
    )
    print("| made | mode | " + " | ".join(STEP_PHASES) + " | drafted |")
    print("|---|---|" + "---|" * (len(STEP_PHASES) + 1))
    for made, (mode, engine) in enumerate(zip(modes, engines, strict=True)):
        stats = engine.stats  # per step that ran (an engine whose requests all ended stops)
        ms = {phase: s / stats.forward_passes * 1e3 for phase, s in stats.step_seconds.items()}
        rows.append(
            {"made": made, "mode": mode, "ms_per_step": ms, "drafted": stats.drafted_tokens}
        )
        cells = " | ".join(f"{ms[phase]:.2f}" for phase in STEP_PHASES)
        print(f"| {made} | {mode} | {cells} | {stats.drafted_tokens} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "temperature": args.temperature,
                "modes": modes,
                "share_fused_weights": args.share_fused_weights,
                "machine": machine_info(),
                "engines": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
