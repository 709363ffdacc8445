from __future__ import annotations

from bench.drafter import batch_workload, run_batch_case


def test_batch_workload_drafts_long_and_alike_in_both_caches() -> None:
    history, cache, speculator, handles, keys = batch_workload(4)
    drafts = speculator.drafts(handles, [16] * 4)
    assert drafts == history.speculate_batch(keys, [16] * 4)
    assert all(len(draft) > 8 for draft in drafts)  # variants of the group's rollouts
    assert all(len(draft) > 0 for draft in cache.speculate_batch(keys, [16] * 4))


def test_batch_case_reports_every_figure() -> None:
    row = run_batch_case(2, steps=1)
    assert row.rows == 2 and row.steps_timed == 1
    assert row.mean_draft_len > 0
    figures = (
        row.loop_us_per_row,
        row.batch_us_per_row,
        row.speculator_us_per_row,
        row.suffix_loop_us_per_row,
        row.suffix_batch_us_per_row,
        row.das_drafts_us_per_row,
        row.das_rate_drafts_us_per_row,
        row.extend_loop_us_per_row,
        row.extend_batch_us_per_row,
        row.extend_one_thread_us_per_row,
        row.das_step_us_per_row,
    )
    assert all(figure > 0 for figure in figures)
