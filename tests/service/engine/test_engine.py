from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from drafter import DrafterConfig, RolloutHistory
from service.engine import Engine, EngineConfig, RequestOutput
from service.engine.engine import STEP_PHASES
from service.engine.models import Tokenizer, tiny_random_model
from service.worker import GenerateRequest, SamplingParams
from tests.service.engine.conftest import counting_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=True)
SAMPLED = SamplingParams(
    temperature=0.7,
    top_p=0.9,
    top_k=50,
    max_tokens=40,
    ignore_eos=True,
    seed=1234,
    logprobs=True,
    top_logprobs=2,
)
PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 4], [17, 17, 18, 40, 41, 42, 43], [250]]


def make_engine(
    model: torch.nn.Module,
    speculation: str = "none",
    history: RolloutHistory | None = None,
    max_batch: int = 4,
    **knobs: object,
) -> Engine:
    config = EngineConfig(
        model="tiny-random",
        max_batch=max_batch,
        max_model_len=128,
        speculation=speculation,
        **knobs,  # type: ignore[arg-type]
    )
    return Engine(config, model=model, tokenizer=None, history=history)


def requests(params: SamplingParams, prompts: list[list[int]] = PROMPTS) -> list[GenerateRequest]:
    return [GenerateRequest(f"r{i}", prompt, params) for i, prompt in enumerate(prompts)]


def history_of(outputs: list[RequestOutput], corrupt_every: int = 0) -> RolloutHistory:
    """A history holding these outputs (drafts then follow them exactly), or copies with every
    corrupt_every-th token changed (drafts partly wrong); without live siblings, so that the
    drafts come from these outputs alone."""
    history = RolloutHistory(DrafterConfig(live_siblings=False))
    for output in outputs:
        for sample in output.samples:
            tokens = list(sample.token_ids)
            if corrupt_every:
                for i in range(corrupt_every - 1, len(tokens), corrupt_every):
                    tokens[i] = (tokens[i] + 1) % 512
            history.add_rollout(output.group, tokens, 0, output.prompt_token_ids)
    return history


def assert_same_outputs(expected: list[RequestOutput], actual: list[RequestOutput]) -> None:
    assert [o.request_id for o in expected] == [o.request_id for o in actual]
    for want, got in zip(expected, actual, strict=True):
        assert len(want.samples) == len(got.samples)
        for a, b in zip(want.samples, got.samples, strict=True):
            assert b.token_ids == a.token_ids
            assert b.finish_reason == a.finish_reason
            assert a.logprobs is not None and b.logprobs is not None
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
            if a.top_logprobs is not None:
                assert b.top_logprobs is not None
                for top_a, top_b in zip(a.top_logprobs, b.top_logprobs, strict=True):
                    assert list(top_a) == list(top_b)


@pytest.mark.parametrize(
    "params", [GREEDY, SAMPLED, dataclasses.replace(SAMPLED, n=3)], ids=["greedy", "sampled", "n3"]
)
def test_speculation_is_lossless(tiny_model: torch.nn.Module, params: SamplingParams) -> None:
    baseline = make_engine(tiny_model).generate(requests(params))
    assert all(s.spec.drafted_tokens == 0 for o in baseline for s in o.samples)
    # Exact drafts, partly wrong drafts, and drafts from an empty history (own context only).
    for history, min_accepted in (
        (history_of(baseline), 0.9),
        (history_of(baseline, corrupt_every=5), 0.3),
        (RolloutHistory(), 0.0),
    ):
        engine = make_engine(tiny_model, "fixed:4", history)
        outputs = engine.generate(requests(params))
        assert_same_outputs(baseline, outputs)
        stats = engine.stats
        assert stats.accepted_tokens >= min_accepted * stats.drafted_tokens
        if min_accepted:
            assert forward_passes(outputs) < forward_passes(baseline)


def forward_passes(outputs: list[RequestOutput]) -> int:
    return sum(s.spec.forward_passes for o in outputs for s in o.samples)


def test_exact_drafts_cut_forward_passes(tiny_model: torch.nn.Module) -> None:
    baseline = make_engine(tiny_model).generate(requests(GREEDY))
    engine = make_engine(tiny_model, "fixed:4", history_of(baseline))
    outputs = engine.generate(requests(GREEDY))
    for output in outputs:
        for sample in output.samples:
            # 40 tokens, 5 per forward pass (4 accepted drafts and the bonus token).
            assert sample.spec.forward_passes == 8
            assert sample.spec.accepted_tokens == sample.spec.drafted_tokens == 32


def test_output_does_not_depend_on_batch_companions(tiny_model: torch.nn.Module) -> None:
    alone = [make_engine(tiny_model).generate([r])[0] for r in requests(SAMPLED)]
    # Two slots for four requests: they queue, join and leave at different steps.
    crowded = make_engine(tiny_model, max_batch=2).generate(requests(SAMPLED))
    assert_same_outputs(alone, crowded)
    varied = [
        GenerateRequest(
            r.request_id, r.prompt_token_ids, dataclasses.replace(SAMPLED, max_tokens=m)
        )
        for r, m in zip(requests(SAMPLED), [40, 7, 23, 40], strict=True)
    ]
    mixed = make_engine(tiny_model, "fixed:3", history_of(alone, 4)).generate(varied)
    for full, short in zip(alone, mixed, strict=True):
        n = len(short.samples[0].token_ids)
        assert short.samples[0].token_ids == full.samples[0].token_ids[:n]


def test_das_policy_is_lossless(tiny_model: torch.nn.Module) -> None:
    baseline = make_engine(tiny_model).generate(requests(SAMPLED))
    engine = make_engine(tiny_model, "das", history_of(baseline, corrupt_every=6))
    assert_same_outputs(baseline, engine.generate(requests(SAMPLED)))
    assert engine.stats.drafted_tokens > 0


def test_stats_time_every_phase_of_the_steps(tiny_model: torch.nn.Module) -> None:
    baseline = make_engine(tiny_model).generate(requests(SAMPLED))
    engine = make_engine(tiny_model, "das", history_of(baseline))
    start = time.perf_counter()
    engine.generate(requests(SAMPLED))
    elapsed = time.perf_counter() - start
    seconds = engine.stats.step_seconds
    assert tuple(seconds) == STEP_PHASES
    assert all(seconds[phase] > 0 for phase in STEP_PHASES)  # drafting included: it drafted
    assert engine.stats.drafted_tokens > 0
    assert sum(seconds.values()) <= elapsed


def test_suffix_policy_is_lossless(tiny_model: torch.nn.Module) -> None:
    """--spec-policy suffix: drafts from its own global cache, which fills as the engine
    decodes; a second round of the same requests (new ids) drafts from the first's outputs."""
    params = dataclasses.replace(SAMPLED, n=2)
    baseline = make_engine(tiny_model).generate(requests(params))
    engine = make_engine(tiny_model, "suffix")
    assert engine.policy.name == "suffix"
    assert_same_outputs(baseline, engine.generate(requests(params)))
    again = [
        GenerateRequest(f"again-{r.request_id}", r.prompt_token_ids, params)
        for r in requests(params)
    ]
    second = engine.generate(again)
    for want, got in zip(baseline, second, strict=True):
        for a, b in zip(want.samples, got.samples, strict=True):
            assert b.token_ids == a.token_ids
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    assert engine.stats.accepted_tokens > 0
    assert forward_passes(second) < forward_passes(baseline)


def test_samples_of_one_request_differ_and_seed_is_reported(tiny_model: torch.nn.Module) -> None:
    params = dataclasses.replace(SAMPLED, n=3, seed=None)
    output = make_engine(tiny_model).generate(requests(params, [PROMPTS[0]]))[0]
    seeds = {s.seed for s in output.samples}
    assert len(seeds) == 1
    assert len({tuple(s.token_ids) for s in output.samples}) == 3
    replay = dataclasses.replace(params, seed=seeds.pop())
    again = make_engine(tiny_model).generate(requests(replay, [PROMPTS[0]]))[0]
    assert [s.token_ids for s in again.samples] == [s.token_ids for s in output.samples]


def test_stop_token_and_max_tokens(tiny_model: torch.nn.Module) -> None:
    free = make_engine(tiny_model).generate(requests(GREEDY, [PROMPTS[0]]))[0].samples[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    stop_at = free.token_ids[12]
    first = free.token_ids.index(stop_at)
    params = dataclasses.replace(GREEDY, stop_token_ids=(stop_at,))
    for speculation, history in (("none", None), ("fixed:8", RolloutHistory())):
        engine = make_engine(tiny_model, speculation, history)
        if history is not None:
            history.add_rollout(engine_group(PROMPTS[0]), free.token_ids, 0, PROMPTS[0])
        sample = engine.generate(requests(params, [PROMPTS[0]]))[0].samples[0]
        assert sample.token_ids == free.token_ids[: first + 1]  # the stop token is kept
        assert sample.finish_reason == "stop" and sample.matched_stop == stop_at
    short = (
        make_engine(tiny_model, "fixed:8", history_of([]))
        .generate(requests(dataclasses.replace(GREEDY, max_tokens=3), [PROMPTS[0]]))[0]
        .samples[0]
    )
    assert short.token_ids == free.token_ids[:3] and short.finish_reason == "length"


def engine_group(prompt: list[int]) -> str:
    from drafter.groups import prompt_group

    return prompt_group(prompt)


def test_eos_stops_unless_ignored(tiny_model: torch.nn.Module) -> None:
    free = make_engine(tiny_model).generate(requests(GREEDY, [PROMPTS[0]]))[0].samples[0]
    eos = free.token_ids[5]
    model = tiny_random_model()
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    engine = make_engine(model)
    params = dataclasses.replace(GREEDY, ignore_eos=False)
    sample = engine.generate(requests(params, [PROMPTS[0]]))[0].samples[0]
    assert sample.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
    assert sample.finish_reason == "stop"


def test_abort_returns_partial_output(tiny_model: torch.nn.Module) -> None:
    engine = make_engine(tiny_model, max_batch=1)
    for request in requests(GREEDY, PROMPTS[:2]):
        engine.add_request(request)
    for _ in range(5):
        assert engine.step() == []
    running = engine.abort("r0")
    queued = engine.abort("r1")
    assert running is not None and queued is not None
    assert len(running.samples[0].token_ids) == 5
    assert running.samples[0].finish_reason == queued.samples[0].finish_reason == "abort"
    assert queued.samples[0].token_ids == []
    assert engine.abort("r0") is None
    assert not engine.has_unfinished() and engine.num_running() == 0
    assert engine.history.groups() == []  # aborted rollouts are not history


def test_pause_holds_steps_and_resume_continues(tiny_model: torch.nn.Module) -> None:
    expected = make_engine(tiny_model).generate(requests(SAMPLED))
    engine = make_engine(tiny_model)
    for request in requests(SAMPLED):
        engine.add_request(request)
    engine.step()
    engine.pause()
    assert engine.paused and engine.step() == []
    with pytest.raises(ValueError, match="paused"):
        engine.generate([])
    engine.resume()
    engine.flush_cache()  # recomputing the cache changes nothing
    done: list[RequestOutput] = []
    while engine.has_unfinished():
        done.extend(engine.step())
    assert_same_outputs(expected, sorted(done, key=lambda o: o.request_id))


def test_update_weights_bumps_version_and_keeps_history(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    engine = make_engine(tiny_model, "fixed:4")
    before = engine.generate(requests(GREEDY, [PROMPTS[0]]))[0]
    assert before.samples[0].weight_version == 0
    other = tiny_random_model(seed=1)
    other.save_pretrained(tmp_path)
    for request in requests(GREEDY, [PROMPTS[1]]):
        engine.add_request(request)
    engine.step()
    assert engine.update_weights(str(tmp_path)) == 1
    assert engine.history.groups() == [before.group]  # history kept (window 4)
    finished: list[RequestOutput] = []
    while engine.has_unfinished():
        finished.extend(engine.step())
    assert finished[0].samples[0].weight_version == 1
    fresh = make_engine(other).generate(requests(GREEDY, [PROMPTS[0]]))[0]
    again = engine.generate(requests(GREEDY, [PROMPTS[0]]))[0]
    assert again.samples[0].token_ids == fresh.samples[0].token_ids
    assert again.samples[0].token_ids != before.samples[0].token_ids
    with pytest.raises(ValueError, match="back"):
        engine.load_weights(other, version=0)


def test_add_request_rejects_what_cannot_run(tiny_model: torch.nn.Module) -> None:
    engine = make_engine(tiny_model)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(GenerateRequest("a", [1] * 100, SamplingParams(max_tokens=29)))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(GenerateRequest("b", [512], SamplingParams()))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request(GenerateRequest("c", [1], SamplingParams(stop=("x",))))
    engine.add_request(GenerateRequest("d", [1], SamplingParams()))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(GenerateRequest("d", [1], SamplingParams()))


def test_engine_config_checks_itself() -> None:
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(speculation="sometimes")
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(max_batch=0)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int8")
    assert EngineConfig().torch_dtype == torch.float32


@pytest.mark.slow
def test_smollm2_speculation_is_lossless_with_stop_strings(
    smollm2: tuple[torch.nn.Module, Tokenizer],
) -> None:
    model, tokenizer = smollm2
    prompts = counting_prompts(tokenizer)
    params = dataclasses.replace(SAMPLED, max_tokens=48, ignore_eos=False, n=2)
    config = EngineConfig(max_batch=4, max_model_len=256)
    baseline = Engine(config, model=model, tokenizer=tokenizer).generate(requests(params, prompts))
    history = history_of(baseline, corrupt_every=7)
    spec_config = dataclasses.replace(config, speculation="fixed:6")
    engine = Engine(spec_config, model=model, tokenizer=tokenizer, history=history)
    assert_same_outputs(baseline, engine.generate(requests(params, prompts)))
    assert engine.stats.accepted_tokens > 0
    text = baseline[0].samples[0].text
    # A stop string the first sample is known to contain (a sampled text may hold no comma).
    middle = len(text) // 2
    stop_string = text[middle : middle + 2]
    assert len(stop_string) == 2
    stop = dataclasses.replace(params, stop=(stop_string,), n=1)
    for speculation in ("none", "fixed:6"):
        cut = (
            Engine(
                dataclasses.replace(config, speculation=speculation),
                model=model,
                tokenizer=tokenizer,
                history=history_of(baseline),
            )
            .generate(requests(stop, prompts[:1]))[0]
            .samples[0]
        )
        assert cut.finish_reason == "stop" and cut.matched_stop == stop_string
        assert stop_string not in cut.text and text.startswith(cut.text)


def test_samples_share_the_prompt_cache(tiny_model: torch.nn.Module) -> None:
    params = dataclasses.replace(SAMPLED, n=4)
    # One slot: each sample runs alone and computes the prompt itself.
    alone = make_engine(tiny_model, max_batch=1)
    expected = alone.generate(requests(params, [PROMPTS[2]]))
    shared = make_engine(tiny_model, max_batch=4)
    assert_same_outputs(expected, shared.generate(requests(params, [PROMPTS[2]])))
    prompt_cost = len(PROMPTS[2]) - 1
    assert alone.stats.prefill_tokens == 4 * prompt_cost
    assert shared.stats.prefill_tokens == prompt_cost


def test_processed_logprobs_are_lossless_too(tiny_model: torch.nn.Module) -> None:
    baseline = make_engine(tiny_model, logprobs_mode="processed").generate(requests(SAMPLED))
    raw = make_engine(tiny_model).generate(requests(SAMPLED))
    assert [s.token_ids for o in raw for s in o.samples] == [
        s.token_ids for o in baseline for s in o.samples
    ]
    for o_raw, o_processed in zip(raw, baseline, strict=True):
        a, b = o_raw.samples[0].logprobs, o_processed.samples[0].logprobs
        assert a is not None and b is not None
        assert a != pytest.approx(b, abs=1e-3)  # temperature, top-k and top-p reshape it
    history = history_of(baseline, corrupt_every=3)
    engine = make_engine(tiny_model, "fixed:4", history, logprobs_mode="processed")
    assert_same_outputs(baseline, engine.generate(requests(SAMPLED)))
