"""tests/sglang: the SGLang backend (service/sglang_plugin).

The tests in this folder need no sglang and run in every environment. Those in real/ run
against SGLang's own code and need `make test-sglang`'s environment (.venv-sglang: sglang
0.5.23 --no-deps, triton, light packages, and the stubs in stubs/); elsewhere they are not
collected, except that DAS_REQUIRE_SGLANG=1 (set by `make test-sglang`) turns a missing
sglang into an error instead of a silent skip.
"""

from __future__ import annotations

import importlib.util
import os

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None

if not HAVE_SGLANG:
    if os.environ.get("DAS_REQUIRE_SGLANG") == "1":
        raise RuntimeError("DAS_REQUIRE_SGLANG=1 but sglang is not importable here")
    collect_ignore = ["real"]
