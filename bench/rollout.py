"""Rollout benchmark and trace recording on the embedded engine (no argparse: see bench/cli.py).

The workload is RL rollout: P prompts x N samples per epoch, the whole epoch submitted at once
as one RL step, epochs in order (the rollout history carries over, the policy version moves
on after each epoch as a weight update would). Every (epoch, prompt) request gets its own seed
and the sample index is part of the sampling RNG key, so each rollout draws its own stream, the
same in every mode: with lossless speculation the outputs must be identical across modes.

Each speculation mode (none, fixed:K, das, suffix) has its own engine with its own history (and
suffix its own global response cache), and runs every epoch. The modes run each epoch together,
taking turns step by step (one engine step of each mode that still runs, then the next, each
round starting with the next mode), each step timed on its own, so that a slow stretch of a
shared machine falls on all of them alike (taking turns epoch by epoch, as this benchmark did
before, left a mode's epoch of 40 s to whatever the machine did then: none's steps at 16-31
rows took 117 ms in one epoch and 148 in the next).
The benchmark records, per mode and epoch:
    makespan_s            the time of the mode's own steps from submission until the last
                          rollout finished (its wall time, had it run alone)
    tokens                output tokens generated
    steps                 engine forward passes (batch steps; each serves the whole batch)
    forwards              rollout verify passes: per rollout, the steps it took part in, summed
                          over rollouts (the simulator's `forwards`)
    tokens_per_forward    tokens / forwards: 1 without speculation, 1 + accepted drafts per pass
    tokens_per_step       tokens / steps: batch throughput per engine forward
    accepted_per_forward  accepted draft tokens / forwards (the simulator's acc/fwd)
    tokens_per_s          tokens / makespan_s
    step_seconds          seconds in each phase of the engine's steps (Engine.stats): admission,
                          drafting, the forward, sampling, recording; the printed table ends
                          with them per step, per mode
    batch_size_over_time  [t_s, rollouts in the step's batch]: a step function, one point per
                          change, ending with [makespan_s, 0]
    mismatched_rollouts   rollouts whose output tokens differ from the reference mode's (none,
                          which therefore runs first); 0 when speculation is lossless
"""

from __future__ import annotations

import gc
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.prompts import encode_prompt, load_prompts
from drafter.config import DrafterConfig
from drafter.cost import (
    CALIBRATE,
    SMOLLM2_CPU,
    CostCurve,
    CostModel,
    LiveStepCost,
    parse_cost_model,
)
from drafter.policy_spec import canonical_mode, mode_policy, parse_policy
from drafter.traces import TraceRecord
from service.engine.calibration import Calibration, calibrate_cost, cost_model_name
from service.engine.config import EngineConfig
from service.engine.engine import STEP_PHASES, Engine
from service.engine.models import SMOLLM2, Tokenizer
from service.worker import GenerateRequest, SamplingParams

DEFAULT_MODES = ("none", "fixed:8", "das")
_SEED_MIX = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1

Progress = Callable[[int], None]  # called with the number of rollouts just finished


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """One benchmark (or trace) run; checks itself."""

    model: str = SMOLLM2
    prompts: str = "math"  # see bench.prompts.load_prompts
    samples: int = 4  # rollouts per prompt per epoch
    epochs: int = 4
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    modes: tuple[str, ...] = DEFAULT_MODES
    max_batch: int | None = None  # None: every rollout of an epoch decodes at once
    # The cost model das plans with: "calibrate" (timed at start-up), a preset or C_BASE,C_TOK.
    cost: str = CALIBRATE
    tree_drafts: bool = False  # every mode drafts best-first trees (the engine verifies them)
    live_siblings: bool = True  # every mode also drafts from its running siblings' outputs
    other_groups: bool = False  # where nothing of its group matches, from every group's rollouts

    def __post_init__(self) -> None:
        for name in ("samples", "epochs", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        SamplingParams(n=self.samples, temperature=self.temperature, top_p=self.top_p)
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not self.modes:
            raise ValueError("need at least one mode")
        canonical = [canonical_mode(mode) for mode in self.modes]
        if len(set(canonical)) != len(canonical):
            raise ValueError(f"modes must be distinct, got {', '.join(self.modes)}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        parse_cost_model(self.cost)  # ValueError for an unknown cost model

    @property
    def ordered_modes(self) -> tuple[str, ...]:
        """The modes canonicalised, `none` first: it is the reference for mismatches."""
        modes = [canonical_mode(mode) for mode in self.modes]
        return tuple(sorted(modes, key=lambda mode: mode != "none"))


# -- the workload --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    groups: tuple[str, ...]  # prompt group ids, one per prompt
    prompts: tuple[tuple[int, ...], ...]  # prompt token ids
    params: SamplingParams  # without a seed: each request gets its own

    def requests(self, epoch: int, seed: int) -> list[GenerateRequest]:
        """One epoch: a request of n samples per prompt, each with its own seed."""
        return [
            GenerateRequest(
                f"e{epoch}-{group}",
                prompt,
                SamplingParams(
                    n=self.params.n,
                    max_tokens=self.params.max_tokens,
                    temperature=self.params.temperature,
                    top_p=self.params.top_p,
                    seed=rollout_seed(seed, epoch, index),
                ),
                group=group,
            )
            for index, (group, prompt) in enumerate(zip(self.groups, self.prompts, strict=True))
        ]

    @property
    def rollouts_per_epoch(self) -> int:
        return len(self.prompts) * self.params.n


def rollout_seed(seed: int, epoch: int, prompt: int) -> int:
    """The request seed of (epoch, prompt): distinct for every pair, the same in every mode.
    Samples of one request differ through the sample index in the RNG key."""
    value = seed & _MASK63
    for part in (epoch, prompt):
        value = (value * _SEED_MIX + part + 1) & _MASK63
    return value


def build_workload(config: RolloutConfig, tokenizer: Tokenizer | None, vocab_size: int) -> Workload:
    """The prompts of config.prompts encoded for this model; ValueError if one is too long."""
    messages = load_prompts(config.prompts, config.seed)
    prompts = tuple(tuple(encode_prompt(m, tokenizer, vocab_size)) for m in messages)
    width = len(str(len(prompts) - 1))
    groups = tuple(f"prompt-{i:0{width}d}" for i in range(len(prompts)))
    params = SamplingParams(
        n=config.samples,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
    )
    return Workload(groups, prompts, params)


# -- one epoch -----------------------------------------------------------------------------


@dataclass(slots=True)
class EpochRun:
    mode: str
    epoch: int
    makespan_s: float
    outputs: dict[tuple[str, int], list[int]]  # (group, sample index) -> output token ids
    steps: int  # engine forward passes
    forwards: int  # rollout verify passes, summed over rollouts
    drafted: int
    accepted: int
    prefill_tokens: int
    batch_size_over_time: list[tuple[float, int]]
    # Per batch-size class (rows 1, 2-3, 4-7, ...: the bit length of rows): [steps, seconds,
    # draft tokens, accepted, prefill tokens] summed over the epoch's steps of that size.
    steps_by_rows: dict[int, list[float]] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)  # per phase of Engine.step
    mismatched_rollouts: int | None = None  # against the reference mode's run of the epoch
    # Per mismatched rollout: where it first left the reference, and the two tokens there.
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    # A das mode's cost model re-timed by its steps up to the epoch's end (LiveStepCost).
    live_cost: list[dict[str, float]] | None = None

    @property
    def tokens(self) -> int:
        return sum(len(output) for output in self.outputs.values())

    def to_json(self) -> dict[str, Any]:
        tokens = self.tokens
        return {
            "mode": self.mode,
            "epoch": self.epoch,
            "rollouts": len(self.outputs),
            "makespan_s": self.makespan_s,
            "tokens": tokens,
            "steps": self.steps,
            "forwards": self.forwards,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "prefill_tokens": self.prefill_tokens,
            "tokens_per_forward": _ratio(tokens, self.forwards),
            "tokens_per_step": _ratio(tokens, self.steps),
            "accepted_per_forward": _ratio(self.accepted, self.forwards),
            "tokens_per_s": _ratio(tokens, self.makespan_s),
            "mean_step_s": _ratio(self.makespan_s, self.steps),
            "step_seconds": self.step_seconds,
            "mismatched_rollouts": self.mismatched_rollouts or 0,
            "mismatches": self.mismatches,
            "lengths": sorted(len(output) for output in self.outputs.values()),
            "batch_size_over_time": [[round(t, 4), n] for t, n in self.batch_size_over_time],
            "steps_by_rows": [
                {
                    "rows": _rows_class(size),
                    "steps": int(steps),
                    "mean_step_s": seconds / steps,
                    "drafted_per_step": drafted / steps,
                    "accepted_per_step": accepted / steps,
                    "prefill_per_step": prefill / steps,
                }
                for size, (steps, seconds, drafted, accepted, prefill) in sorted(
                    self.steps_by_rows.items()
                )
            ],
            **({} if self.live_cost is None else {"live_cost": self.live_cost}),
        }


def _rows_class(size: int) -> str:
    """Batch sizes of one bit length: "1", "2-3", "4-7", ..."""
    low, high = 1 << (size - 1), (1 << size) - 1
    return str(low) if low == high else f"{low}-{high}"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


class EpochRecorder:
    """One mode's run of one epoch, a step at a time: its requests are submitted at once on an
    idle engine, and each step() runs and records one engine step, timed on its own. The
    epoch's makespan is the sum of its steps' times, so modes stepping in turn (run_bench)
    each count only their own steps."""

    def __init__(
        self,
        engine: Engine,
        requests: Sequence[GenerateRequest],
        mode: str,
        epoch: int,
        progress: Progress | None = None,
    ) -> None:
        if engine.has_unfinished():
            raise ValueError("an epoch needs an idle engine")
        self.engine, self.mode, self.epoch, self._progress = engine, mode, epoch, progress
        stats = engine.stats
        self._before = (stats.forward_passes, stats.drafted_tokens, stats.accepted_tokens)
        self._prefill_before, self._finished_before = stats.prefill_tokens, stats.finished_samples
        self._seconds_before = dict(stats.step_seconds)
        for request in requests:
            engine.add_request(request)
        self._timeline: list[tuple[float, int]] = []
        self._outputs: dict[tuple[str, int], list[int]] = {}
        self._forwards = 0
        self._now, self._active = 0.0, 0
        self._by_rows: dict[int, list[float]] = {}

    @property
    def running(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> None:
        engine, stats = self.engine, self.engine.stats
        counted = (stats.drafted_tokens, stats.accepted_tokens, stats.prefill_tokens)
        start = time.perf_counter()
        done = engine.step()
        seconds = time.perf_counter() - start
        began, self._now = self._now, self._now + seconds
        for output in done:
            for result in output.samples:
                self._outputs[(output.group, result.index)] = result.token_ids
                self._forwards += result.spec.forward_passes
        finished = stats.finished_samples - self._finished_before
        self._finished_before = stats.finished_samples
        # The step's batch: what still runs after it, and what it finished.
        batch = engine.num_running() + finished
        if batch != self._active:
            self._timeline.append((began, batch))
            self._active = batch
        step = (
            1,
            seconds,
            stats.drafted_tokens - counted[0],
            stats.accepted_tokens - counted[1],
            stats.prefill_tokens - counted[2],
        )
        totals = self._by_rows.setdefault(batch.bit_length(), [0.0] * len(step))
        for i, value in enumerate(step):
            totals[i] += value
        if finished and self._progress is not None:
            self._progress(finished)

    def result(self) -> EpochRun:
        stats = self.engine.stats
        live = self.engine.speculator.cost_curve
        return EpochRun(
            mode=self.mode,
            epoch=self.epoch,
            makespan_s=self._now,  # when the step that finished the last rollout ended
            outputs=self._outputs,
            steps=stats.forward_passes - self._before[0],
            forwards=self._forwards,
            drafted=stats.drafted_tokens - self._before[1],
            accepted=stats.accepted_tokens - self._before[2],
            prefill_tokens=stats.prefill_tokens - self._prefill_before,
            batch_size_over_time=[*self._timeline, (self._now, 0)],
            steps_by_rows=self._by_rows,
            step_seconds={
                phase: seconds - self._seconds_before[phase]
                for phase, seconds in stats.step_seconds.items()
            },
            live_cost=live.to_json() if isinstance(live, LiveStepCost) else None,
        )


def mode_engine(
    config: RolloutConfig,
    mode: str,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    workload: Workload,
    cost: CostModel,
    cost_curve: CostCurve | None = None,
) -> Engine:
    """A fresh engine with a fresh history for one mode of the benchmark. Where `cost_curve`
    is given, a das policy is priced at each step by it as the engine's timed steps correct it
    (its own LiveStepCost; das/startup: by the curve alone; das/line: by `cost` alone)."""
    name, pricing = mode_policy(mode)
    longest = max(len(prompt) for prompt in workload.prompts)
    engine_config = EngineConfig(
        model=config.model,
        max_batch=config.max_batch or workload.rollouts_per_epoch,
        max_model_len=longest + config.max_tokens,
        max_prefill_tokens=max(2048, longest),
        speculation=name,
        drafter=DrafterConfig(
            tree_drafts=config.tree_drafts,
            live_siblings=config.live_siblings,
            other_groups=config.other_groups,
        ),
    )
    return Engine(
        engine_config,
        model=model,
        tokenizer=tokenizer,
        policy=parse_policy(name, cost),
        cost_curve=_mode_curve(cost_curve, pricing),
    )


def _mode_curve(curve: CostCurve | None, pricing: str) -> CostCurve | LiveStepCost | None:
    if curve is None or pricing == "line":
        return None
    return curve if pricing == "startup" else LiveStepCost(curve)


def run_epochs_in_turn(
    engines: dict[str, Engine],
    workload: Workload,
    config: RolloutConfig,
    epoch: int,
    progress: Progress | None = None,
) -> dict[str, EpochRun]:
    """One epoch of every mode, the modes taking turns step by step (each timed on its own),
    then the training step between epochs: the rollouts just made join each mode's history
    under this policy version, and the next epoch samples under the next one."""
    requests = workload.requests(epoch, config.seed)
    recorders = [
        EpochRecorder(engine, requests, mode, epoch, progress) for mode, engine in engines.items()
    ]
    first = 0
    while any(recorder.running for recorder in recorders):
        # Each round starts with the next mode: none follows the same one every time.
        for recorder in recorders[first:] + recorders[:first]:
            if recorder.running:
                recorder.step()
        first = (first + 1) % len(recorders)
    for engine in engines.values():
        engine.history.set_version(epoch + 1)
    return {recorder.mode: recorder.result() for recorder in recorders}


def count_mismatches(runs: Sequence[EpochRun], reference: Sequence[EpochRun]) -> None:
    """Set each run's mismatched_rollouts: rollouts whose tokens differ from the reference
    run of the same epoch (a rollout missing from either counts as mismatched)."""
    by_epoch = {run.epoch: run for run in reference}
    for run in runs:
        ref = by_epoch[run.epoch].outputs
        run.mismatches = []
        for key in sorted(set(ref) | set(run.outputs)):
            expected, got = ref.get(key), run.outputs.get(key)
            if expected == got:
                continue
            detail: dict[str, Any] = {"group": key[0], "sample": key[1]}
            if expected is not None and got is not None:
                position = next(
                    (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                    min(len(expected), len(got)),
                )
                detail.update(
                    position=position,
                    reference_token=expected[position] if position < len(expected) else None,
                    token=got[position] if position < len(got) else None,
                    reference_length=len(expected),
                    length=len(got),
                )
            run.mismatches.append(detail)
        run.mismatched_rollouts = len(run.mismatches)


def trace_records(runs: Sequence[EpochRun], workload: Workload) -> list[TraceRecord]:
    """The runs' rollouts as trace records, by epoch, prompt and sample index."""
    records = []
    for run in runs:
        for group, prompt in zip(workload.groups, workload.prompts, strict=True):
            for index in range(workload.params.n):
                output = run.outputs[(group, index)]
                records.append(TraceRecord(group, run.epoch, prompt, tuple(output)))
    return records


# -- the benchmark -------------------------------------------------------------------------


@dataclass(slots=True)
class BenchResult:
    config: RolloutConfig
    workload: Workload
    calibration: Calibration
    machine: dict[str, Any]
    runs: list[EpochRun] = field(default_factory=list)

    def runs_of(self, mode: str) -> list[EpochRun]:
        return [run for run in self.runs if run.mode == mode]

    def summary(self) -> list[dict[str, Any]]:
        """Per mode over all epochs: totals, and makespan relative to the reference mode."""
        reference = self.config.ordered_modes[0]
        base = sum(run.makespan_s for run in self.runs_of(reference))
        rows = []
        for mode in self.config.ordered_modes:
            runs = self.runs_of(mode)
            if not runs:
                continue
            makespan = sum(run.makespan_s for run in runs)
            tokens = sum(run.tokens for run in runs)
            forwards = sum(run.forwards for run in runs)
            steps = sum(run.steps for run in runs)
            rows.append(
                {
                    "mode": mode,
                    "makespan_s": makespan,
                    "tokens": tokens,
                    "steps": steps,
                    "forwards": forwards,
                    "tokens_per_forward": _ratio(tokens, forwards),
                    "tokens_per_step": _ratio(tokens, steps),
                    "accepted_per_forward": _ratio(sum(r.accepted for r in runs), forwards),
                    "tokens_per_s": _ratio(tokens, makespan),
                    "makespan_ratio": _ratio(makespan, base),
                    "mismatched_rollouts": sum(r.mismatched_rollouts or 0 for r in runs),
                    "ms_per_step": {
                        phase: _ratio(sum(r.step_seconds[phase] for r in runs), steps) * 1e3
                        for phase in STEP_PHASES
                    },
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        config = asdict(self.config)
        config["modes"] = list(self.config.ordered_modes)
        config["reference_mode"] = self.config.ordered_modes[0]
        config["prompt_count"] = len(self.workload.prompts)
        config["prompt_tokens"] = [len(prompt) for prompt in self.workload.prompts]
        config["rollouts_per_epoch"] = self.workload.rollouts_per_epoch
        config["max_batch"] = self.config.max_batch or self.workload.rollouts_per_epoch
        config["cost_model"] = self.calibration.to_json()
        return {
            "config": config,
            "machine": self.machine,
            "definitions": DEFINITIONS,
            "runs": [run.to_json() for run in self.runs],
            "summary": self.summary(),
        }


DEFINITIONS = {
    "makespan_s": "wall time from submitting the epoch's rollouts until the last one finished",
    "steps": "engine forward passes (batch steps, each serving every running rollout)",
    "forwards": "rollout verify passes: per rollout the steps it took part in, summed",
    "tokens_per_forward": "output tokens / forwards (1 + accepted drafts per rollout pass)",
    "tokens_per_step": "output tokens / steps",
    "accepted_per_forward": "accepted draft tokens / forwards",
    "mismatched_rollouts": "rollouts whose output tokens differ from the reference mode's "
    "run of the same epoch",
    "step_seconds": "seconds in each phase of the engine's steps, summed: admission "
    "(schedule), the speculator's drafts (draft), the forward, sampling and acceptance "
    "(sample), appending tokens and the speculator's bookkeeping (record)",
    "ms_per_step": "step_seconds over all epochs, per step, in milliseconds",
    "batch_size_over_time": "[seconds since submission, rollouts in the batch of the step "
    "starting then], one point per change, ending with [makespan_s, 0]",
}


def machine_info() -> dict[str, Any]:
    import transformers  # only for its version

    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in load],
    }


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else None: machines here differ."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def run_bench(
    config: RolloutConfig,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    progress: Progress | None = None,
    on_calibrated: Callable[[Calibration], None] | None = None,
) -> BenchResult:
    """Every mode (none first: the reference) over every epoch, the modes taking turns step
    by step; see the module docstring."""
    vocab_size = model_vocab_size(model)
    workload = build_workload(config, tokenizer, vocab_size)
    machine = machine_info()
    max_batch = config.max_batch or workload.rollouts_per_epoch
    cost = parse_cost_model(config.cost)
    if cost is None:
        calibration = calibrate_cost(model, max_batch, temperature=config.temperature)
    else:
        calibration = Calibration(cost, cost_model_name(cost))
    if on_calibrated is not None:
        on_calibrated(calibration)
    result = BenchResult(config, workload, calibration, machine)
    modes = config.ordered_modes
    engines = {
        mode: mode_engine(
            config, mode, model, tokenizer, workload, calibration.cost, calibration.curve
        )
        for mode in modes
    }
    # Each runner times the native matmul against torch's when it is made (Runner's doc).
    machine["native_matmul_rows"] = {
        mode: list(engine.runner.small_matmul_rows) for mode, engine in engines.items()
    }
    runs: dict[str, list[EpochRun]] = {mode: [] for mode in modes}
    for epoch in range(config.epochs):
        for mode, run in run_epochs_in_turn(engines, workload, config, epoch, progress).items():
            runs[mode].append(run)
        gc.collect()
    for mode in modes:
        count_mismatches(runs[mode], runs[modes[0]])
        result.runs.extend(runs[mode])  # listed mode by mode
    del engines
    gc.collect()
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def record_trace(
    config: RolloutConfig,
    model: torch.nn.Module,
    tokenizer: Tokenizer | None,
    progress: Progress | None = None,
) -> tuple[list[TraceRecord], list[EpochRun]]:
    """Rollouts of config.modes[0] (speculation never changes them) as trace records."""
    vocab_size = model_vocab_size(model)
    workload = build_workload(config, tokenizer, vocab_size)
    mode = mode_policy(config.modes[0])[0]
    engines = {mode: mode_engine(config, mode, model, tokenizer, workload, SMOLLM2_CPU)}
    runs = [
        run_epochs_in_turn(engines, workload, config, epoch, progress)[mode]
        for epoch in range(config.epochs)
    ]
    return trace_records(runs, workload), runs


def model_vocab_size(model: torch.nn.Module) -> int:
    config: Any = model.config  # a Hugging Face model's config
    return int(config.vocab_size)


# -- reporting -----------------------------------------------------------------------------

_COLUMNS = (
    ("mode", 9),
    ("epoch", 5),
    ("makespan_s", 10),
    ("tokens", 7),
    ("steps", 6),
    ("forwards", 8),
    ("tok/fwd", 7),
    ("tok/step", 8),
    ("acc/fwd", 7),
    ("tok/s", 7),
    ("ms/step", 7),
    ("ratio", 6),
    ("mismatch", 8),
)


def format_table(result: BenchResult) -> str:
    """The per-epoch, per-mode table `das bench rollout` prints."""
    config, cost = result.config, result.calibration.cost
    lines = [
        f"model {config.model} | prompts {config.prompts} ({len(result.workload.prompts)}) x "
        f"{config.samples} samples x {config.epochs} epochs | max_tokens {config.max_tokens} | "
        f"temperature {config.temperature} | max_batch "
        f"{config.max_batch or result.workload.rollouts_per_epoch} | torch threads "
        f"{result.machine['torch_threads']}",
        f"cost model for das: {result.calibration.source}, c_base {cost.c_base * 1e3:.1f} ms + "
        f"c_tok {cost.c_tok * 1e3:.3f} ms/token",
        "  ".join(f"{name:>{width}}" for name, width in _COLUMNS),
    ]
    reference = {run.epoch: run.makespan_s for run in result.runs_of(config.ordered_modes[0])}
    for run in result.runs:
        data = run.to_json()
        cells = (
            run.mode,
            str(run.epoch),
            f"{run.makespan_s:.2f}",
            str(data["tokens"]),
            str(run.steps),
            str(run.forwards),
            f"{data['tokens_per_forward']:.2f}",
            f"{data['tokens_per_step']:.2f}",
            f"{data['accepted_per_forward']:.2f}",
            f"{data['tokens_per_s']:.1f}",
            f"{data['mean_step_s'] * 1e3:.0f}",
            f"{_ratio(run.makespan_s, reference.get(run.epoch, 0.0)):.3f}",
            str(data["mismatched_rollouts"]),
        )
        lines.append(
            "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, _COLUMNS, strict=True))
        )
    for row in result.summary():
        lines.append(
            f"{row['mode']:>9}  all    {row['makespan_s']:8.2f}s  tokens {row['tokens']}, "
            f"tok/fwd {row['tokens_per_forward']:.2f}, tok/s {row['tokens_per_s']:.1f}, "
            f"ratio {row['makespan_ratio']:.3f}, mismatched {row['mismatched_rollouts']}"
        )
    for row in result.summary():
        phases = ", ".join(f"{phase} {ms:.2f}" for phase, ms in row["ms_per_step"].items())
        lines.append(f"{row['mode']:>9}  ms per step: {phases}")
    lines.append(
        "tok/fwd, acc/fwd: per rollout verify pass; tok/step: per engine forward; ratio: "
        f"makespan / {config.ordered_modes[0]}'s in the same epoch"
    )
    return "\n".join(lines)


def write_plot(result: BenchResult, path: str | Path) -> None:
    """A PNG: makespan per epoch per mode (bars), and active rollouts over time (epochs laid
    end to end) per mode. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [mode for mode in result.config.ordered_modes if result.runs_of(mode)]
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        runs = result.runs_of(mode)
        xs = [run.epoch + (i - (len(modes) - 1) / 2) * width for run in runs]
        bars.bar(xs, [run.makespan_s for run in runs], width, label=mode)
        offset = 0.0
        times: list[float] = []
        active: list[int] = []
        for run in runs:
            for t, n in run.batch_size_over_time:
                times.append(offset + t)
                active.append(n)
            offset += run.makespan_s
        lines.step(times, active, where="post", label=mode)
    bars.set_xlabel("epoch")
    bars.set_ylabel("makespan (s)")
    bars.set_xticks(range(result.config.epochs))
    bars.set_title("rollout makespan per epoch")
    bars.legend()
    lines.set_xlabel("time (s), epochs end to end")
    lines.set_ylabel("active rollouts")
    lines.set_title("batch size over time")
    lines.legend()
    fig.suptitle(
        f"{result.config.model}, {result.config.prompts} x {result.config.samples} samples, "
        f"max_tokens {result.config.max_tokens}, T={result.config.temperature}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
