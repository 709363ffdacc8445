"""The worker's HTTP API, one module per dialect, as vLLM's entrypoints are laid out.

- completions: OpenAI /v1/completions (and the OpenAI sampling fields -> SamplingParams)
- chat: OpenAI /v1/chat/completions
- sglang: SGLang's native /generate
- vllm: vLLM's token-in/token-out /inference/v1/generate
- control: abort, pause/continue, weights, flush cache, health, server info, /v1/models
- generation: what they all share (running requests on the worker, streams, usage, metrics)
- deps: the app state and headers the routers get through Depends

Each dialect module maps its wire request (service.protocol) to SamplingParams in one
function, runs it through Generation, builds its wire response, and ends with a thin router.
"""
