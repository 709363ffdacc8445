"""The RL-like rollout workload on vLLM: one vLLM engine per mode, modes taking turns epoch by
epoch in one run (the machine's load drifts alike for all of them).

Modes: none (no speculation), ngram (vLLM's prompt-lookup drafter), suffix (vLLM's suffix
decoding, ArcticInference's tree) and das (our DasProposer through the plugin); optionally
engine-none, the embedded torch engine without speculation on the same prompts and seeds.
Per mode and epoch: makespan, output tokens, tokens per forward pass per rollout (from
drafted/accepted: a rollout's forward gives 1 + accepted tokens), acceptance, and the
rollouts whose tokens differ from none's (same seeds). Writes JSON and a PNG; a progress bar.

    .venv-vllm/bin/python -m bench.vllm_rollout --epochs 4 --temperature 0.7 \\
        --json bench/results/vllm-rollout.json --plot bench/results/vllm-rollout.png

Runs in `make test-vllm`'s environment (.venv-vllm).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.prompts import encode_prompt, load_prompts

MODES = ("none", "ngram", "suffix", "das")
_SEED_MIX = 0x9E3779B97F4A7C15  # bench.rollout's, which this must not import before vLLM
_MASK63 = 2**63 - 1


def rollout_seed(seed: int, epoch: int, prompt: int) -> int:
    """bench.rollout.rollout_seed: the same seeds as the embedded engine's benchmark (that
    module imports the embedded engine, whose native module vLLM's kernel scan trips on)."""
    value = seed & _MASK63
    for part in (epoch, prompt):
        value = (value * _SEED_MIX + part + 1) & _MASK63
    return value


ALL_MODES = (*MODES, "engine-none")
_GROUP, _SAMPLE, _ID = "das_group", "das_sample", "das_id"  # service.vllm_backend.drafting


@dataclass(slots=True)
class Run:
    mode: str
    epoch: int
    makespan_s: float
    outputs: dict[tuple[int, int], list[int]]
    drafted: int = 0
    accepted: int = 0
    mismatched: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs.values())

    def to_json(self) -> dict[str, Any]:
        tokens = self.tokens
        forwards = tokens - self.accepted  # each rollout forward: 1 token + its accepted ones
        return {
            "mode": self.mode,
            "epoch": self.epoch,
            "makespan_s": self.makespan_s,
            "tokens": tokens,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "tokens_per_forward": tokens / forwards if forwards else 0.0,
            "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
            "mismatched_rollouts": self.mismatched,
            "lengths": sorted(len(o) for o in self.outputs.values()),
            **self.extra,
        }


class VllmMode:
    def __init__(self, mode: str, model_path: str, args: argparse.Namespace, cost: str) -> None:
        from vllm import LLM

        spec: dict[str, Any] | None
        extra: dict[str, Any] = {}
        if mode == "none":
            spec = None
        elif mode == "ngram":
            spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
        elif mode == "suffix":
            spec = {"method": "suffix", "num_speculative_tokens": 16}
        else:
            spec = {"method": "suffix", "num_speculative_tokens": 16}
            extra = {"das": {"policy": args.das_policy, "cost_model": cost}}
        self.mode = mode
        self.llm = LLM(
            model_path,
            dtype="float32",
            enforce_eager=True,
            max_model_len=args.max_model_len,
            max_num_seqs=max(64, args.prompts_count * args.samples),
            seed=0,
            speculative_config=spec,
            additional_config=extra,
            disable_log_stats=False,
        )
        self.tally: dict[str, Any] = {"drafted": 0, "accepted": 0, "steps": 0}
        self.tally["propose_seconds"] = 0.0

    def run(self, prompts: Sequence[Sequence[int]], args: argparse.Namespace, epoch: int) -> Run:
        from vllm import SamplingParams

        inputs, params, keys = [], [], []
        for p, prompt in enumerate(prompts):
            seed = rollout_seed(args.seed, epoch, p)
            for s in range(args.samples):
                das_id = f"e{epoch}-p{p}-s{s}"
                inputs.append({"prompt_token_ids": list(prompt)})
                params.append(
                    SamplingParams(
                        temperature=args.temperature,
                        max_tokens=args.max_tokens,
                        seed=(seed + s) % 2**63,
                        extra_args={_GROUP: f"prompt-{p}", _SAMPLE: s, _ID: das_id},
                    )
                )
                keys.append((p, s, das_id))
        start = time.perf_counter()
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        makespan = time.perf_counter() - start
        tokens = {
            (p, s): list(o.outputs[0].token_ids) for (p, s, _), o in zip(keys, outputs, strict=True)
        }
        run = Run(self.mode, epoch, makespan, tokens)
        if self.mode == "das":
            ended = [
                (das_id, o.outputs[0].finish_reason in ("stop", "length"), len(tokens[(p, s)]))
                for (p, s, das_id), o in zip(keys, outputs, strict=True)
            ]
            answer = self.llm.collective_rpc("das_rpc", args=("settle", ended))[0]
            run.drafted = sum(c[1] for c in answer["counters"].values())
            run.accepted = sum(c[2] for c in answer["counters"].values())
            self.llm.collective_rpc("das_rpc", args=("set_version", epoch + 1))
            run.extra["das"] = self.llm.collective_rpc("das_rpc", args=("stats",))[0]
        if self.mode != "none":
            tally = self.llm.collective_rpc("das_rpc", args=("tally",))[0]
            if self.mode != "das":
                run.drafted = tally["drafted"] - self.tally["drafted"]
                run.accepted = tally["accepted"] - self.tally["accepted"]
            run.extra["propose_s"] = tally["propose_seconds"] - self.tally["propose_seconds"]
            run.extra["steps"] = tally["steps"] - self.tally["steps"]
            self.tally = tally
        return run

    def calibrate(self, vocab: int) -> None:
        """The warm-up every mode gets (das times these steps for its cost model, as
        VllmWorker does at start-up): prefills of 8 to 128 tokens, 4 decode steps each."""
        from vllm import SamplingParams

        rng = random.Random(0)
        for round_ in range(3):
            for size in (8, 16, 32, 64, 128):
                das_id = f"calibrate-{round_}-{size}"
                prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(size)]}
                params = SamplingParams(
                    max_tokens=4, temperature=0.0, ignore_eos=True, extra_args={_ID: das_id}
                )
                self.llm.generate([prompt], [params], use_tqdm=False)
                if self.mode == "das":
                    self.llm.collective_rpc("das_rpc", args=("settle", [(das_id, False, 4)]))
        if self.mode != "none":
            self.tally = self.llm.collective_rpc("das_rpc", args=("tally",))[0]


class EngineNone:
    """The embedded torch engine without speculation (bench.rollout's engine), same seeds."""

    def __init__(self, prompts: Sequence[Sequence[int]], args: argparse.Namespace) -> None:
        from drafter.cost import SMOLLM2_CPU
        from drafter.policy_spec import parse_policy
        from service.engine import Engine, EngineConfig
        from service.engine.models import load_model

        model, tokenizer = load_model("smollm2-135m")
        config = EngineConfig(
            model="smollm2-135m",
            max_batch=len(prompts) * args.samples,
            max_model_len=max(len(p) for p in prompts) + args.max_tokens,
            max_prefill_tokens=2048,
            speculation="none",
        )
        self.engine = Engine(
            config, model=model, tokenizer=tokenizer, policy=parse_policy("none", SMOLLM2_CPU)
        )

    def run(self, prompts: Sequence[Sequence[int]], args: argparse.Namespace, epoch: int) -> Run:
        from service.worker import GenerateRequest, SamplingParams

        engine = self.engine
        for p, prompt in enumerate(prompts):
            engine.add_request(
                GenerateRequest(
                    f"e{epoch}-p{p}",
                    list(prompt),
                    SamplingParams(
                        n=args.samples,
                        max_tokens=args.max_tokens,
                        temperature=args.temperature,
                        seed=rollout_seed(args.seed, epoch, p),
                    ),
                    group=f"prompt-{p}",
                )
            )
        outputs: dict[tuple[int, int], list[int]] = {}
        start = time.perf_counter()
        while engine.has_unfinished():
            for output in engine.step():
                p = int(output.request_id.rsplit("-p", 1)[1])
                for sample in output.samples:
                    outputs[(p, sample.index)] = sample.token_ids
        return Run("engine-none", epoch, time.perf_counter() - start, outputs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_rollout", description=__doc__)
    parser.add_argument("--prompts", default="math:8", help="bench.prompts set (math:8)")
    parser.add_argument("--samples", type=int, default=4, help="rollouts per prompt (4)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs (4)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per rollout (512)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0.7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(ALL_MODES)}")
    parser.add_argument("--das-policy", default="das", help="das, das-rate, das-eq7 or fixed:K")
    parser.add_argument(
        "--cost-model", default="calibrate", help="das: calibrate (on vLLM's steps) or a preset"
    )
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument(
        "--engine-epochs", type=int, default=1, help="epochs engine-none runs (the first 1)"
    )
    parser.add_argument("--json", type=Path, help="write the runs here")
    parser.add_argument("--plot", type=Path, help="write a PNG of makespan per epoch here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown {', '.join(unknown) or 'empty'}")
    args.mode_list = modes
    return args


def plot(runs: Sequence[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for mode in dict.fromkeys(run.mode for run in runs):
        points = sorted((run.epoch, run.makespan_s) for run in runs if run.mode == mode)
        axis.plot([e for e, _ in points], [t for _, t in points], marker="o", label=mode)
    axis.set_xlabel("epoch")
    axis.set_ylabel("makespan (s)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["DAS_VLLM"] = "1"  # our plugin: the DasProposer and the CPU sampler fix
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # every engine in this process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from service.vllm_backend.worker import resolve_model

    model_path = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    messages = load_prompts(args.prompts, args.seed)
    prompts = [encode_prompt(m, tokenizer, len(tokenizer)) for m in messages]
    args.prompts_count = len(prompts)
    started = time.perf_counter()
    engines: dict[str, Any] = {}
    # Building an engine, vLLM 0.32 scans sys.modules for Triton kernels to rebind and trips
    # on llvmlite's objects, which the ngram proposer imports (numba): ngram is built last.
    for mode in sorted(args.mode_list, key=lambda m: (m == "engine-none", m == "ngram")):
        if mode == "engine-none":
            engines[mode] = EngineNone(prompts, args)
        else:
            engines[mode] = VllmMode(mode, model_path, args, args.cost_model)
            engines[mode].calibrate(len(tokenizer))
    setup_s = time.perf_counter() - started
    runs: list[Run] = []
    engine_runs = min(args.epochs, args.engine_epochs) if "engine-none" in args.mode_list else 0
    total = args.epochs * (len(args.mode_list) - (engine_runs > 0)) + engine_runs
    bar = tqdm(total=total, disable=args.no_progress, desc="mode-epochs", file=sys.stderr)
    for epoch in range(args.epochs):
        # Turns rotate: no mode always runs first (or right after the heaviest one).
        order = list(args.mode_list)
        shift = epoch % len(order)
        for mode in order[shift:] + order[:shift]:
            if mode == "engine-none" and epoch >= args.engine_epochs:
                continue  # no speculation: its makespan does not depend on the history
            run = engines[mode].run(prompts, args, epoch)
            runs.append(run)
            bar.set_postfix(mode=mode, epoch=epoch, s=f"{run.makespan_s:.0f}")
            bar.update(1)
            write_json(runs, args, setup_s)  # after every run: a long run that stops keeps them
    bar.close()
    reference = write_json(runs, args, setup_s)
    print_table(runs, reference)
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        title = f"vLLM rollouts, T = {args.temperature}, {len(prompts)} x {args.samples}"
        plot(runs, args.plot, title)
    return 0


def write_json(runs: Sequence[Run], args: argparse.Namespace, setup_s: float) -> dict[int, Run]:
    """Count mismatches against none's run of each epoch, write --json; the reference runs."""
    reference = {run.epoch: run for run in runs if run.mode == "none"}
    for run in runs:
        ref = reference.get(run.epoch)
        if ref is not None and run is not ref:
            run.mismatched = sum(run.outputs.get(k) != v for k, v in ref.outputs.items())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
        config = {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}
        data = {"config": config, "setup_s": setup_s, "runs": [run.to_json() for run in runs]}
        args.json.write_text(json.dumps(data, indent=1))
    return reference


def print_table(runs: Sequence[Run], reference: dict[int, Run]) -> None:
    header = f"{'mode':<12}{'epoch':>6}{'makespan s':>12}{'x none':>8}{'tokens':>8}"
    header += f"{'tok/fwd':>9}{'accept':>8}{'mismatch':>10}"
    print(header)
    for run in sorted(runs, key=lambda r: (r.epoch, r.mode)):
        data = run.to_json()
        ref = reference.get(run.epoch)
        ratio = run.makespan_s / ref.makespan_s if ref is not None and ref.makespan_s else 0.0
        print(
            f"{run.mode:<12}{run.epoch:>6}{run.makespan_s:>12.1f}{ratio:>8.2f}{data['tokens']:>8}"
            f"{data['tokens_per_forward']:>9.2f}{data['acceptance']:>8.2f}{run.mismatched:>10}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
