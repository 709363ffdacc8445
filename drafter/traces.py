"""Rollout traces: recorded (or synthetic) rollouts that the simulator replays.

A trace is JSON lines, one finished rollout per line:
    {"group": str, "epoch": int, "prompt": [int], "output": [int]}
group is the prompt group (every rollout of one prompt shares it), epoch the training epoch
(policy version) that produced it. Other keys are ignored, except "synthetic": true, which marks
a rollout made by synthetic_trace rather than by a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

_TOKEN_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class TraceRecord:
    group: str
    epoch: int
    prompt: tuple[int, ...]
    output: tuple[int, ...]
    synthetic: bool = False  # made by synthetic_trace, not by a model

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group:
            raise ValueError("group must be a non-empty string")
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {self.epoch!r}")
        _check_tokens("prompt", self.prompt)
        _check_tokens("output", self.output)
        if not self.output:
            raise ValueError("output must hold at least one token")

    def to_json(self) -> dict[str, object]:
        line: dict[str, object] = {
            "group": self.group,
            "epoch": self.epoch,
            "prompt": list(self.prompt),
            "output": list(self.output),
        }
        if self.synthetic:
            line["synthetic"] = True
        return line


def _check_tokens(name: str, tokens: Sequence[int]) -> None:
    for token in tokens:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= _TOKEN_MAX:
            raise ValueError(f"{name} must hold token ids in [0, 2**31 - 1], got {token!r}")


def parse_json_object(line: str) -> dict[str, Any]:
    """One JSON-lines line as an object; ValueError saying what is wrong with it."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error.msg}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def parse_record(line: str) -> TraceRecord:
    """One trace line as a record; ValueError saying what is wrong with it."""
    data = parse_json_object(line)
    missing = [key for key in ("group", "epoch", "prompt", "output") if key not in data]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for key in ("prompt", "output"):
        if not isinstance(data[key], list):
            raise ValueError(f"{key} must be a list of token ids")
    synthetic = data.get("synthetic", False)
    if not isinstance(synthetic, bool):
        raise ValueError("synthetic must be true or false")
    return TraceRecord(
        group=data["group"],
        epoch=data["epoch"],
        prompt=tuple(data["prompt"]),
        output=tuple(data["output"]),
        synthetic=synthetic,
    )


def read_trace(path: str | Path) -> list[TraceRecord]:
    """Every record of a JSON-lines trace (blank lines skipped). OSError if the file cannot be
    read; ValueError naming the first bad line."""
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(parse_record(line))
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    return records


def write_trace(path: str | Path, records: Iterable[TraceRecord]) -> int:
    """Write records as JSON lines; returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            count += 1
    return count


# -- synthetic traces ----------------------------------------------------------------------

EOS = 0  # synthetic rollouts end with it; phrase and prompt tokens are >= 1


@dataclass(frozen=True, slots=True)
class SyntheticShape:
    """How synthetic rollouts are built (see synthetic_trace)."""

    vocab_size: int = 8192
    phrases: int = 40  # phrase units per group
    phrase_tokens: tuple[int, int] = (3, 12)  # tokens per phrase, [low, high)
    templates: int = 3  # solution paths per group
    template_units: tuple[int, int] = (10, 24)  # phrases per solution path, [low, high)
    median_units: float = 22.0  # median phrases per rollout (varies per group)
    group_spread: float = 0.5  # lognormal sigma of a group's median over groups
    length_spread: float = 0.7  # lognormal sigma of rollout length within a group
    switch: float = 0.08  # per phrase: continue on another solution path
    skip: float = 0.05  # per phrase: leave the phrase out
    novel: float = 0.05  # per phrase: insert a phrase never seen before
    token_noise: float = 0.02  # per token: replace it with a random token
    drift: float = 0.08  # per epoch: share of template phrases replaced, and of phrases edited
    max_tokens: int = 1024  # rollouts are cut here (no EOS then), like a max_tokens limit

    def __post_init__(self) -> None:
        if self.vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {self.vocab_size}")
        for name, (low, high) in (
            ("phrase_tokens", self.phrase_tokens),
            ("template_units", self.template_units),
        ):
            if not 1 <= low < high:
                raise ValueError(f"{name} must be [low, high) with 1 <= low < high")
        if self.phrases < 2 or self.templates < 1:
            raise ValueError("need phrases >= 2 and templates >= 1")
        if self.median_units < 1 or self.max_tokens < 1:
            raise ValueError("median_units and max_tokens must be >= 1")
        probabilities = (self.switch, self.skip, self.novel, self.token_noise, self.drift)
        if (
            not all(0.0 <= p <= 1.0 for p in probabilities)
            or self.switch + self.skip + (self.novel) > 1.0
        ):
            raise ValueError("probabilities must be in [0, 1], switch + skip + novel <= 1")
        if self.group_spread < 0 or self.length_spread < 0:
            raise ValueError("spreads must be >= 0")


@dataclass(slots=True)
class _Group:
    name: str
    prompt: tuple[int, ...]
    phrases: list[npt.NDArray[np.int64]]
    templates: list[list[int]]  # phrase indices
    weights: npt.NDArray[np.float64]  # how often each template is followed
    median_units: float


def synthetic_trace(
    groups: int = 8,
    samples: int = 8,
    epochs: int = 6,
    seed: int = 0,
    shape: SyntheticShape | None = None,
) -> list[TraceRecord]:
    """A SYNTHETIC trace, labelled as such in every record: no model produced it.

    It imitates what DAS exploits in real RL rollouts. Each group (prompt) has a bank of phrase
    units and a few template "solution paths" (sequences of phrases); a rollout follows one
    path, now and then switching to another, skipping a phrase, inserting a novel one, or
    (after the path ends) going over part of one again, with a little per-token noise. Rollout
    lengths are long-tailed (lognormal within a group, group medians lognormal too). Between
    epochs the templates drift: a few phrases are swapped and a few edited, as a policy that
    changes a little every step. Deterministic for a given seed.
    """
    if groups < 1 or samples < 1 or epochs < 1:
        raise ValueError("groups, samples and epochs must be >= 1")
    shape = shape or SyntheticShape()
    rng = np.random.default_rng(seed)
    states = [_new_group(f"synthetic-{g:03d}", rng, shape) for g in range(groups)]
    records = []
    for epoch in range(epochs):
        if epoch > 0:
            for state in states:
                _drift(state, rng, shape)
        for state in states:
            for _ in range(samples):
                output = _rollout(state, rng, shape)
                records.append(TraceRecord(state.name, epoch, state.prompt, output, True))
    return records


def _tokens(rng: np.random.Generator, shape: SyntheticShape, size: int) -> npt.NDArray[np.int64]:
    return rng.integers(1, shape.vocab_size, size=size)


def _new_group(name: str, rng: np.random.Generator, shape: SyntheticShape) -> _Group:
    prompt = tuple(int(t) for t in _tokens(rng, shape, int(rng.integers(12, 48))))
    phrases = [
        _tokens(rng, shape, int(rng.integers(*shape.phrase_tokens))) for _ in range(shape.phrases)
    ]
    templates = [
        rng.integers(0, shape.phrases, size=int(rng.integers(*shape.template_units))).tolist()
        for _ in range(shape.templates)
    ]
    weights = rng.dirichlet(np.ones(shape.templates))
    median = shape.median_units * float(rng.lognormal(0.0, shape.group_spread))
    return _Group(name, prompt, phrases, templates, weights, median)


def _drift(state: _Group, rng: np.random.Generator, shape: SyntheticShape) -> None:
    for template in state.templates:
        for i in range(len(template)):
            if rng.random() < shape.drift:
                template[i] = int(rng.integers(0, shape.phrases))
    for phrase in state.phrases:
        if rng.random() < shape.drift:
            phrase[int(rng.integers(0, len(phrase)))] = int(rng.integers(1, shape.vocab_size))


def _rollout(state: _Group, rng: np.random.Generator, shape: SyntheticShape) -> tuple[int, ...]:
    units = max(1, round(state.median_units * float(rng.lognormal(0.0, shape.length_spread))))
    path = int(rng.choice(len(state.templates), p=state.weights))
    position = 0
    pieces: list[npt.NDArray[np.int64]] = []
    while len(pieces) < units:
        template = state.templates[path]
        if position >= len(template):
            # The path is done but the rollout is not: go over part of a path again.
            path = int(rng.choice(len(state.templates), p=state.weights))
            position = int(rng.integers(0, max(1, len(state.templates[path]) // 2)))
            continue
        draw = rng.random()
        if draw < shape.switch:
            path = int(rng.integers(0, len(state.templates)))
            continue
        draw -= shape.switch
        if draw < shape.skip:
            position += 1
            continue
        draw -= shape.skip
        if draw < shape.novel:
            pieces.append(_tokens(rng, shape, int(rng.integers(*shape.phrase_tokens))))
            continue
        pieces.append(state.phrases[template[position]])
        position += 1
    tokens = np.concatenate(pieces)
    noisy = rng.random(tokens.size) < shape.token_noise
    tokens = np.where(noisy, _tokens(rng, shape, tokens.size), tokens)
    if tokens.size >= shape.max_tokens:
        return tuple(int(t) for t in tokens[: shape.max_tokens])
    return (*(int(t) for t in tokens), EOS)
