"""Two epochs of one prompt group through our worker and SGLang's own verify preparation and
greedy tree verify (TRITON_INTERPRET=1), with a simulated target model in place of the forward
and this test in place of SGLang's scheduler loop (prefill, decode steps, result processing,
finish): the outputs are exactly the target's, and the second epoch, drafting from the first
one's rollouts, needs far fewer verify steps."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_triton
from sglang.srt.managers.schedule_batch import FINISH_LENGTH
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.speculative import ngram_worker

from drafter.speculator import Rollout

from .test_worker import PROMPT, WIDTH, make_req, make_worker

LENGTH = 40  # max_new_tokens
OFF = 999  # the target's token after a prefix it would never generate
# The target's greedy rollout of PROMPT: no repeated n-grams, so the request's own context
# drafts nothing and everything the second epoch gains comes from the first one's history.
TARGET = [100 + (7 * i) % 61 for i in range(LENGTH)]
# Two samples that agree for 12 tokens, then part (as sampled rollouts of one prompt do).
BRANCHES = [TARGET, [*TARGET[:12], *(300 + (11 * i) % 53 for i in range(LENGTH - 12))]]


def target_next(output: list[int], rollout: list[int] = TARGET) -> int:
    """The simulated model: what it generates after PROMPT + output (towards `rollout`)."""
    if output == rollout[: len(output)] and len(output) < LENGTH:
        return rollout[len(output)]
    return OFF


def verify_step(
    worker: Any, reqs: list[Any], rollouts: list[list[int]], trees: list[int]
) -> list[list[int]]:
    """One decode step: SGLang's verify preparation on our drafts, the target's predictions
    for every node (request b towards rollouts[b]), SGLang's greedy tree verify; the tokens
    each request commits. Appends to `trees` the rows whose draft branched."""
    bs = len(reqs)
    seq_lens = torch.tensor([len(PROMPT) + len(req.output_ids) for req in reqs])
    batch = SimpleNamespace(
        reqs=reqs,
        grammar_needs_sync=lambda: False,
        has_grammar=False,
        spec_info=None,
        forward_mode=ForwardMode.DECODE,
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(),
        req_pool_indices=torch.arange(bs),
        req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros((bs, 128), dtype=torch.int64)),
    )
    worker.das.see(reqs)  # as our forward_batch_generation does first
    worker._prepare_for_speculative_decoding(batch)
    verify = batch.spec_info
    tokens = verify.draft_token.reshape(bs, WIDTH).tolist()
    mask = verify.custom_mask.reshape(bs, WIDTH, -1)
    target = torch.empty((bs, WIDTH), dtype=torch.int64)
    for b, req in enumerate(reqs):
        own = mask[b, :, int(seq_lens[b]) :]  # the tree part of the full mask
        for i in range(WIDTH):
            path = [tokens[b][j] for j in range(1, i + 1) if own[i, j]]
            target[b, i] = target_next([*req.output_ids, *path], rollouts[b])
    trees += [b for b in range(bs) if (verify.retrieve_next_sibling[b] >= 0).any()]
    predicts = torch.zeros(bs * WIDTH, dtype=torch.int32)
    accept_index = torch.full((bs, verify.max_tree_depth), -1, dtype=torch.int32)
    accepted = torch.empty(bs, dtype=torch.int32)
    verify_tree_greedy_triton(
        predicts,
        accept_index,
        accepted,
        verify.draft_token.reshape(bs, WIDTH),
        verify.retrieve_index,
        verify.retrieve_next_token,
        verify.retrieve_next_sibling,
        target,
    )
    return [[int(predicts[i]) for i in row if i >= 0] for row in accept_index.tolist()]


def run_epoch(
    worker: Any, epoch: int, rollouts: list[list[int]], trees: list[int] | None = None
) -> tuple[list[list[int]], int]:
    """A group's samples (sample s towards rollouts[s]) from prefill to their length limit;
    (outputs, verify steps)."""
    reqs = [make_req(f"e{epoch}s{s}", max_new_tokens=LENGTH) for s in range(len(rollouts))]
    toward = {req.rid: rollout for req, rollout in zip(reqs, rollouts, strict=True)}
    worker.das.see(reqs)  # the prefill batch
    for req in reqs:
        req.output_ids.append(target_next([], toward[req.rid]))  # the prefill's token
    steps = 0
    live = list(reqs)
    while live:
        steps += 1
        committed_tokens = verify_step(
            worker, live, [toward[req.rid] for req in live], trees if trees is not None else []
        )
        for req, committed in zip(live, committed_tokens, strict=True):
            room = LENGTH - len(req.output_ids)
            req.output_ids.extend(committed[:room])  # result processing, sync mode
            if len(req.output_ids) == LENGTH:
                req.finished_reason = FINISH_LENGTH(length=LENGTH)
                worker.note_request_finished(rid=req.rid, natural_stop=False)
        live = [req for req in live if not req.finished()]
    return [list(req.output_ids) for req in reqs], steps


def fresh_worker(published: list[Rollout]) -> Any:
    worker = make_worker(overlap=False, policy="fixed:16", published=published)
    worker.das.speculator.history.evict_before(1)  # no history of this group yet
    worker.max_batch_size, worker.device = 4, "cpu"
    worker._init_preallocated_tensors()
    return worker


def test_two_epochs_are_lossless_and_the_second_drafts_from_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ngram_worker, "prepare_mamba_track_for_verify", lambda batch: None)
    published: list[Rollout] = []
    worker = fresh_worker(published)

    first, first_steps = run_epoch(worker, 0, [TARGET, TARGET])
    second, second_steps = run_epoch(worker, 1, [TARGET, TARGET])

    assert first == second == [TARGET, TARGET]  # the target's tokens, drafts or none
    assert [rollout.output for rollout in published] == [TARGET] * 4
    assert first_steps == LENGTH - 1  # nothing to draft from: one token per step
    assert second_steps <= (LENGTH - 1) // (WIDTH - 1) + 1  # whole drafts accepted


def test_samples_that_part_get_tree_drafts_and_stay_lossless(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ngram_worker, "prepare_mamba_track_for_verify", lambda batch: None)
    worker = fresh_worker([])
    first, first_steps = run_epoch(worker, 0, BRANCHES)
    trees: list[int] = []
    second, second_steps = run_epoch(worker, 1, BRANCHES, trees)
    assert first == second == BRANCHES
    assert trees  # where the two rollouts part, the draft holds both continuations
    assert second_steps < first_steps // 3
