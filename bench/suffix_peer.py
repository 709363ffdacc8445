"""Our suffix policy's drafts against ArcticInference's own suffix decoding cache, row by row.

    python -m bench.suffix_peer --trace T.jsonl [--json OUT]      (in .venv-vllm: it needs
                                                                   arctic_inference)

Replays the trace as das simulate does (each epoch one batch, every row drafting before any is
verified, a row emitting its accepted draft tokens and the target's next one), feeding the same
tokens to drafter.suffix_decoding.SuffixDecodingCache and to arctic_inference's
SuffixDecodingCache with vLLM's default settings (tree depth 24, 10,000 cached responses,
spec factor 1.0, min token probability 0.1, 16 tokens; the context is the last 24 tokens). The
rows advance by our draft's acceptance, so both caches always hold the same tokens. Reports the
share of drafts that are identical, of equal length, and the accepted tokens each would get.
Arctic's tie-break between equally frequent continuations is its own, so a few drafts may differ
where two continuations are equally likely. Prints a line and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from drafter.simulator import accepted_tokens
from drafter.suffix_decoding import SuffixDecodingCache, SuffixDecodingConfig
from drafter.traces import TraceRecord, read_trace


@dataclass(slots=True)
class PeerReport:
    rows: int = 0  # drafts compared
    identical: int = 0  # same tokens
    same_length: int = 0
    ours_accepted: int = 0  # accepted tokens of our drafts against the recording
    theirs_accepted: int = 0  # of Arctic's drafts
    ours_drafted: int = 0
    theirs_drafted: int = 0


def compare(trace: Sequence[TraceRecord], config: SuffixDecodingConfig) -> PeerReport:
    from arctic_inference.suffix_decoding import SuffixDecodingCache as ArcticCache

    ours = SuffixDecodingCache(config)
    theirs = ArcticCache(
        max_tree_depth=config.max_depth, max_cached_requests=config.max_cached_requests
    )
    report = PeerReport()
    for epoch in sorted({record.epoch for record in trace}):
        batch = [(i, r) for i, r in enumerate(trace) if r.epoch == epoch]
        context: dict[int, list[int]] = {}
        position = dict.fromkeys((i for i, _ in batch), 0)
        for index, record in batch:
            prompt = np.asarray(record.prompt, dtype=np.int32)
            ours.start_request(index, record.group, prompt)
            theirs.start_request(index, prompt)
            context[index] = list(record.prompt)
        live = [i for i, _ in batch]
        while live:
            budgets = [config.max_spec_tokens] * len(live)
            mine = ours.speculate_batch(live, budgets)
            steps = []
            for index, draft in zip(live, mine, strict=True):
                pattern = np.asarray(context[index][-config.max_depth :], dtype=np.int32)
                other = theirs.speculate(
                    index,
                    pattern,
                    max_spec_tokens=config.max_spec_tokens,
                    max_spec_factor=config.spec_factor,
                    max_spec_offset=config.spec_offset,
                    min_token_prob=config.min_prob,
                )
                output = trace[index].output
                at = position[index]
                target = output[at : at + config.max_spec_tokens + 1]
                accepted = accepted_tokens(draft, target)
                other_tokens = list(other.token_ids)
                report.rows += 1
                report.identical += other_tokens == draft.token_ids
                report.same_length += len(other_tokens) == len(draft)
                report.ours_drafted += len(draft)
                report.theirs_drafted += len(other_tokens)
                report.ours_accepted += len(accepted)
                matched = 0
                for token, expected in zip(other_tokens, target, strict=False):
                    if token != expected:
                        break
                    matched += 1
                report.theirs_accepted += matched
                emitted = target[: len(accepted) + 1]
                steps.append((index, emitted))
            for index, emitted in steps:
                tokens = np.asarray(emitted, dtype=np.int32)
                ours.extend_request(index, tokens)
                theirs.add_active_response(index, tokens)
                context[index] += list(emitted)
                position[index] += len(emitted)
                if position[index] == len(trace[index].output):
                    ours.stop_request(index)
                    theirs.stop_request(index)
                    live.remove(index)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", required=True, type=Path, help="JSON-lines rollout trace")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    trace = read_trace(args.trace)
    config = SuffixDecodingConfig()
    report = compare(trace, config)
    print(
        f"{report.rows} drafts: {report.identical / report.rows:.4f} identical, "
        f"{report.same_length / report.rows:.4f} of equal length; accepted tokens ours "
        f"{report.ours_accepted} of {report.ours_drafted} drafted, Arctic's "
        f"{report.theirs_accepted} of {report.theirs_drafted}"
    )
    if args.json is not None:
        payload = {"trace": str(args.trace), "config": asdict(config), **asdict(report)}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
