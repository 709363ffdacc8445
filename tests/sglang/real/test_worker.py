"""DasNgramWorker on fake batches of SGLang's real Req objects, sync and overlap scheduling.

The worker is built without NGRAMWorker.__init__ (that needs a model runner and a GPU): the
attributes its draft path reads are set by hand, as SGLang's __init__ would set them, and our
state comes from das_init. A batch is what _prepare_draft_tokens reads of a ScheduleBatch:
reqs, grammar_needs_sync() and, in overlap mode, spec_info's accept_tokens / accept_lens.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT, FINISH_LENGTH, Req
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.cpp_ngram.ngram_corpus import NgramCorpus
from sglang.srt.speculative.ngram_worker import NGRAMWorker

from drafter.config import DrafterConfig
from drafter.cost import H100_7B
from drafter.history import RolloutHistory
from drafter.policy_spec import parse_policy
from drafter.speculator import Rollout, Speculator
from service.sglang_plugin.drafting import BatchDrafter
from service.sglang_plugin.worker import DasDrafts, das_worker_class

DasNgramWorker = das_worker_class()

WIDTH = 8
PROMPT = [7, 8, 9]
ROLLOUT = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]  # the group's earlier rollout


def make_worker(
    overlap: bool, policy: str = "fixed:16", published: list[Rollout] | None = None
) -> Any:
    worker = DasNgramWorker.__new__(DasNgramWorker)
    assert isinstance(worker, DasDrafts) and isinstance(worker, NGRAMWorker)
    worker.draft_token_num = WIDTH
    worker.speculative_num_draft_tokens = WIDTH
    worker.enable_overlap = overlap
    worker.max_trie_depth = 18
    worker.ngram_corpus = NgramCorpus(max_trie_depth=18, draft_token_num=WIDTH, capacity=1000)
    worker._prev_decode_rids = set()
    history = RolloutHistory(DrafterConfig(tree_drafts=True))
    history.add_rollout("g", ROLLOUT, 0, PROMPT)
    speculator = Speculator(
        history,
        parse_policy(policy, H100_7B),
        max_draft=WIDTH - 1,
        publish=published.append if published is not None else None,
    )
    versions = iter(["v0"] * 1000)
    worker.das_init(BatchDrafter(speculator), lambda: next(versions))
    return worker


def make_req(rid: str, max_new_tokens: int = 64, group: str | None = "g") -> Req:
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        custom_params={"prompt_group": group} if group is not None else None,
    )
    return Req(rid, "", array("q", PROMPT), params)


def batch(reqs: list[Req], accepted: list[list[int]] | None = None) -> Any:
    """A decode batch; accepted: last round's accepted tokens per request (overlap mode)."""
    spec_info = None
    if accepted is not None:
        tokens = torch.zeros(len(reqs) * WIDTH, dtype=torch.int32)
        for i, row in enumerate(accepted):
            tokens[i * WIDTH : i * WIDTH + len(row)] = torch.tensor(row, dtype=torch.int32)
        lens = torch.tensor([len(row) for row in accepted], dtype=torch.int32)
        spec_info = SimpleNamespace(accept_tokens=tokens, accept_lens=lens)
    return SimpleNamespace(reqs=reqs, grammar_needs_sync=lambda: False, spec_info=spec_info)


def rows(tokens: np.ndarray) -> list[list[int]]:
    return tokens.reshape(-1, WIDTH).tolist()


def test_sync_mode_drafts_the_groups_rollout_after_the_root() -> None:
    worker = make_worker(overlap=False)
    req = make_req("a")
    worker.das.see([req])  # its prefill
    req.output_ids.append(ROLLOUT[0])  # the prefill's token
    tokens, mask = worker._prepare_draft_tokens(batch([req]))
    assert tokens.dtype == mask.dtype == np.int64
    assert tokens.shape == (WIDTH,) and mask.shape == (WIDTH * WIDTH,)
    assert rows(tokens) == [[ROLLOUT[0], *ROLLOUT[1:WIDTH]]]  # root, then 7 draft tokens
    grid = mask.reshape(WIDTH, WIDTH)
    assert (grid == np.tril(np.ones((WIDTH, WIDTH), dtype=np.int64))).all()  # a chain
    # The target accepted 3 of them and added its own token: the next draft goes on from there.
    req.output_ids.extend([*ROLLOUT[1:4], 99])
    tokens, _ = worker._prepare_draft_tokens(batch([req]))
    assert tokens[0] == 99
    spec = worker.das.tracked["a"].spec
    assert spec.output == [ROLLOUT[0], *ROLLOUT[1:4], 99]
    assert spec.counters.accepted == 3


def test_overlap_mode_splices_last_rounds_accepted_tokens() -> None:
    worker = make_worker(overlap=True)
    req = make_req("a")
    worker.das.see([req])
    # Overlap: output_ids lags a step; the prefill's token arrives as last round's accept.
    tokens, _ = worker._prepare_draft_tokens(batch([req], accepted=[[ROLLOUT[0]]]))
    assert rows(tokens) == [[ROLLOUT[0], *ROLLOUT[1:WIDTH]]]
    assert worker.prev_accept_lens == [1]  # staged as NGRAMWorker stages it
    # Next step: output_ids now holds the prefill token; the last verify accepted 2 + 1.
    req.output_ids.append(ROLLOUT[0])
    tokens, _ = worker._prepare_draft_tokens(batch([req], accepted=[[*ROLLOUT[1:3], 77]]))
    assert tokens[0] == 77
    assert worker.das.tracked["a"].spec.output == [*ROLLOUT[:3], 77]
    assert worker.das.tracked["a"].spec.counters.accepted == 2


def test_a_batch_drafts_per_request_and_pads_the_rest() -> None:
    worker = make_worker(overlap=False)
    known, stranger = make_req("a"), make_req("b", group="other")
    worker.das.see([known, stranger])
    known.output_ids.append(ROLLOUT[0])
    stranger.output_ids.append(5)
    tokens, mask = worker._prepare_draft_tokens(batch([known, stranger]))
    assert tokens.shape == (2 * WIDTH,) and mask.shape == (2 * WIDTH * WIDTH,)
    first, second = rows(tokens)
    assert first == [ROLLOUT[0], *ROLLOUT[1:WIDTH]]
    # No history for "other" and nothing in its own context after token 5: root and padding.
    assert second == [5] + [0] * (WIDTH - 1)


def test_nothing_is_drafted_beyond_max_new_tokens() -> None:
    worker = make_worker(overlap=False)
    req = make_req("a", max_new_tokens=4)
    worker.das.see([req])
    req.output_ids.append(ROLLOUT[0])  # 3 more may come: 2 draft tokens and the bonus one
    tokens, _ = worker._prepare_draft_tokens(batch([req]))
    assert rows(tokens) == [[ROLLOUT[0], *ROLLOUT[1:3]] + [0] * (WIDTH - 3)]
    req.output_ids.extend(ROLLOUT[1:3])  # one more may come: the target's own
    tokens, _ = worker._prepare_draft_tokens(batch([req]))
    assert rows(tokens) == [[ROLLOUT[2]] + [0] * (WIDTH - 1)]


def test_a_finished_rollout_joins_the_history_and_is_published() -> None:
    published: list[Rollout] = []
    worker = make_worker(overlap=False, published=published)
    req = make_req("a", max_new_tokens=3)
    worker.das.see([req])
    req.output_ids.append(60)
    worker._prepare_draft_tokens(batch([req]))
    req.output_ids.extend([61, 62])
    req.finished_reason = FINISH_LENGTH(length=3)  # a length finish is natural for us
    worker.note_request_finished(rid="a", natural_stop=False)
    assert published == [Rollout("g", PROMPT, [60, 61, 62], 0)]
    assert worker.das.speculator.history.recent_lengths("g") == [len(ROLLOUT), 3]
    assert "a" not in worker.das.tracked


def test_an_aborted_request_is_not_recorded() -> None:
    published: list[Rollout] = []
    worker = make_worker(overlap=False, published=published)
    req = make_req("a")
    worker.das.see([req])
    req.output_ids.append(60)
    req.finished_reason = FINISH_ABORT()
    worker.note_request_finished(rid="a", natural_stop=False)
    assert published == []
    assert worker.das.speculator.history.recent_lengths("g") == [len(ROLLOUT)]


def test_a_request_that_finishes_during_prefill_is_recorded() -> None:
    published: list[Rollout] = []
    worker = make_worker(overlap=False, published=published)
    req = make_req("a", max_new_tokens=1, group=None)  # group: its prompt's hash
    worker.das.see([req])  # the prefill batch
    req.output_ids.append(70)
    req.finished_reason = FINISH_LENGTH(length=1)  # SGLang does not tell the spec worker
    worker.das.see([make_req("b")])  # the next batch it is not in
    assert [rollout.output for rollout in published] == [[70]]
    assert published[0].group != "g"


def test_overlap_keeps_the_final_output_when_a_step_ran_past_the_stop() -> None:
    published: list[Rollout] = []
    worker = make_worker(overlap=True, published=published)
    req = make_req("a")
    worker.das.see([req])
    worker._prepare_draft_tokens(batch([req], accepted=[[60]]))
    req.output_ids.append(60)
    worker._prepare_draft_tokens(batch([req], accepted=[[61, 62, 63]]))  # 62 was a stop
    req.output_ids.extend([61, 62, 63])
    req.finished_len = 3  # the scheduler cut the output after the stop token
    req.finished_reason = FINISH_LENGTH(length=3)
    worker.note_request_finished(rid="a", natural_stop=True)
    assert [rollout.output for rollout in published] == [[60, 61, 62]]


def test_flush_and_memory_release_keep_the_rollout_history() -> None:
    worker = make_worker(overlap=False)
    req = make_req("a", max_new_tokens=1)
    worker.das.see([req])
    req.output_ids.append(70)
    req.finished_reason = FINISH_LENGTH(length=1)
    worker.clear_cache_pool()  # what /flush_cache and release_memory_occupation call
    history = worker.das.speculator.history
    assert history.recent_lengths("g") == [len(ROLLOUT), 1]  # kept, and the sweep added one
    assert worker.das.tracked == {}


def test_a_new_weight_version_moves_the_history_on(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_worker(overlap=False)
    versions = iter(["v1"])
    worker._das_weight_version = lambda: next(versions)
    monkeypatch.setattr(NGRAMWorker, "forward_batch_generation", lambda self, *a, **k: "ran")
    assert worker.forward_batch_generation(batch([])) == "ran"
    assert worker.das.speculator.history.version == 1


def test_forward_shows_every_batch_to_the_drafter_first(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = make_worker(overlap=False)
    seen: list[list[str]] = []

    def forward(self: Any, batch: Any, **kw: Any) -> str:
        seen.append(sorted(self.das.tracked))
        return "ran"

    monkeypatch.setattr(NGRAMWorker, "forward_batch_generation", forward)
    worker.forward_batch_generation(batch([make_req("a"), make_req("b")]))
    assert seen == [["a", "b"]]


def test_ranks_fed_the_same_events_draft_the_same_tokens() -> None:
    def run() -> list[list[int]]:
        worker = make_worker(overlap=False, policy="das")
        reqs = [make_req(f"r{i}") for i in range(3)]
        worker.das.see(reqs)
        out = []
        for step in range(4):
            for i, req in enumerate(reqs):
                req.output_ids.extend(ROLLOUT[step : step + 1 + i % 2])
            out += rows(worker._prepare_draft_tokens(batch(reqs))[0])
        return out

    assert run() == run()


def test_the_worker_builds_from_the_launchers_environment_and_rank_0_publishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.settings import Settings
    from service.sglang_plugin import worker as worker_module
    from service.sglang_plugin.launch import sglang_env

    def ngram_init(self: Any, *args: Any, **kwargs: Any) -> None:  # what we read of it
        self.draft_token_num = 6

    monkeypatch.setattr(NGRAMWorker, "__init__", ngram_init)
    monkeypatch.setattr(worker_module, "_served_weight_version", lambda: "default")
    launched = Settings(
        **{
            "backend": "sglang",
            "cost_model": "h100-7b",
            "spec_policy": "das-eq7",
            "redis_url": "redis://127.0.0.1:1/0",  # never reached: nothing is published
        }
    )
    for key, value in sglang_env(launched, {}).items():
        monkeypatch.setenv(key, value)
    workers = {}
    for rank in (1, 0):
        monkeypatch.setattr(worker_module, "_tp_rank", lambda rank=rank: rank)
        workers[rank] = DasNgramWorker(None, 0, 0, None)
    assert workers[1]._das_publisher is None
    assert workers[0]._das_publisher is not None
    workers[0]._das_publisher.close()
    for worker in workers.values():
        speculator = worker.das.speculator
        assert speculator.max_draft == 5  # D - 1, D read from SGLang
        assert speculator.policy.name == "das-eq7"


def test_our_drafts_through_sglangs_own_verify_preparation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NGRAMWorker._prepare_for_speculative_decoding (SGLang's, unchanged) on our drafts: the
    verify batch it builds, then SGLang's greedy tree verify on it against a target that
    generates the group's rollout. (Mamba tracking, off for this model kind, needs SGLang's
    published config, so it is a no-op here; cache locations are the GPU's business.)"""
    from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_triton
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.speculative import ngram_worker

    monkeypatch.setattr(ngram_worker, "prepare_mamba_track_for_verify", lambda batch: None)
    worker = make_worker(overlap=False)
    worker.max_batch_size, worker.device = 4, "cpu"
    worker._init_preallocated_tensors()  # SGLang's own buffers, sized once
    req = make_req("a")
    worker.das.see([req])
    req.output_ids.append(ROLLOUT[0])
    seq_len = len(PROMPT) + 1
    decode = SimpleNamespace(
        reqs=[req],
        grammar_needs_sync=lambda: False,
        has_grammar=False,
        spec_info=None,
        forward_mode=ForwardMode.DECODE,
        seq_lens=torch.tensor([seq_len]),
        seq_lens_cpu=torch.tensor([seq_len]),
        req_pool_indices=torch.tensor([0]),
        req_to_token_pool=SimpleNamespace(req_to_token=torch.zeros((4, 64), dtype=torch.int64)),
    )
    worker._prepare_for_speculative_decoding(decode)
    assert decode.forward_mode == ForwardMode.TARGET_VERIFY
    assert decode.input_ids.tolist() == [ROLLOUT[0], *ROLLOUT[1:WIDTH]]
    verify = decode.spec_info
    assert verify.positions.tolist() == list(range(seq_len, seq_len + WIDTH))
    assert verify.retrieve_next_token.tolist() == [[*range(1, WIDTH), -1]]
    # The full mask: every draft node sees the whole cached prefix, then its own ancestors.
    full = verify.custom_mask.reshape(WIDTH, seq_len + WIDTH)
    assert bool(full[:, :seq_len].all())
    assert full[:, seq_len:].tolist() == np.tril(np.ones((WIDTH, WIDTH), dtype=bool)).tolist()
    # The target generates the rollout up to its 5th token, then something else.
    truth = [*ROLLOUT[1:5], 999, 998, 997, 996, 995]
    target = torch.tensor([[truth[i] for i in range(WIDTH)]])  # after node i: truth[i]
    predicts = torch.zeros(WIDTH, dtype=torch.int32)
    accept_index = torch.full((1, verify.max_tree_depth), -1, dtype=torch.int32)
    accepted = torch.empty(1, dtype=torch.int32)
    verify_tree_greedy_triton(
        predicts,
        accept_index,
        accepted,
        verify.draft_token.reshape(1, WIDTH),
        verify.retrieve_index,
        verify.retrieve_next_token,
        verify.retrieve_next_sibling,
        target,
    )
    assert int(accepted[0]) == 4  # ROLLOUT[1:5]
    nodes = [int(i) for i in accept_index[0] if i >= 0]
    assert [int(predicts[i]) for i in nodes] == truth[:5]  # 4 accepted and the target's own


def test_a_finished_request_still_in_an_overlap_batch_drafts_nothing_and_ends_once() -> None:
    published: list[Rollout] = []
    worker = make_worker(overlap=True, published=published)
    req = make_req("a")
    worker.das.see([req])
    worker._prepare_draft_tokens(batch([req], accepted=[[60]]))
    req.output_ids.append(60)
    req.finished_reason = FINISH_LENGTH(length=1)
    worker.note_request_finished(rid="a", natural_stop=False)
    worker.das.see([req])  # the batch launched before the result still holds it
    tokens, _ = worker._prepare_draft_tokens(batch([req], accepted=[[61]]))
    assert rows(tokens) == [[61] + [0] * (WIDTH - 1)]
    worker.das.see([])
    assert [rollout.output for rollout in published] == [[60]]
    assert worker.das.tracked == {}
