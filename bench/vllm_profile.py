"""Where vLLM's step time goes, by mode: bench.vllm_rollout's workload under cProfile.

Builds one engine per mode (as bench.vllm_rollout does), runs epoch 0 unprofiled so the
drafters have a history, then profiles epoch 1 of each mode and prints its makespan, steps,
tokens per forward and the profile's top entries by cumulative time (model forward,
sample_tokens, the rejection sampler, the proposer). Run it alone on a core (see the README's
vLLM benchmark), in .venv-vllm:

    OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=0 taskset -c 0 .venv-vllm/bin/python \\
        -m bench.vllm_profile --temperature 0.7 --modes none,das,suffix
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_profile", description=__doc__)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--modes", default="none,das,suffix", help="of none, ngram, suffix, das")
    parser.add_argument("--top", type=int, default=45, help="profile entries printed per mode")
    options = parser.parse_args(argv)
    os.environ["DAS_VLLM"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer

    from bench import vllm_rollout
    from bench.prompts import encode_prompt, load_prompts
    from service.vllm_backend.worker import resolve_model

    args = vllm_rollout.parse_args(
        ["--max-tokens", str(options.max_tokens), "--temperature", str(options.temperature)]
    )
    model_path = resolve_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    messages = load_prompts(args.prompts, args.seed)
    prompts = [encode_prompt(m, tokenizer, len(tokenizer)) for m in messages]
    args.prompts_count = len(prompts)
    modes = [m.strip() for m in options.modes.split(",") if m.strip()]
    engines: dict[str, vllm_rollout.VllmMode] = {}
    for mode in sorted(modes, key=lambda m: m == "ngram"):  # ngram last, as vllm_rollout
        engines[mode] = vllm_rollout.VllmMode(mode, model_path, args, args.cost_model)
        engines[mode].calibrate(len(tokenizer))
    for mode in modes:
        engines[mode].run(prompts, args, 0)  # a history for epoch 1
    for mode in modes:
        profile = cProfile.Profile()
        profile.enable()
        run = engines[mode].run(prompts, args, 1)
        profile.disable()
        report = io.StringIO()
        pstats.Stats(profile, stream=report).sort_stats("cumulative").print_stats(options.top)
        data = run.to_json()
        print(
            f"===== {mode}: makespan {run.makespan_s:.1f} s, {data['tokens']} tokens, longest "
            f"{max(data['lengths'])}, steps {run.extra.get('steps')}, tokens per forward "
            f"{data['tokens_per_forward']:.2f}, drafted {run.drafted}, accepted {run.accepted}"
        )
        print(report.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
