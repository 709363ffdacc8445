"""`das worker --backend sglang --model PATH [-- SGLANG_ARG ...]`: an SGLang server with our
drafts.

The worker becomes `python -m sglang.launch_server` (exec: SGLang owns the process, its
signals and its exit status) with our flags first and the caller's after them, so a flag the
caller repeats wins (SGLang's argparse keeps the last):
- --speculative-algorithm NGRAM: SGLang's NGRAM verify path, defaults and checks; our plugin
  (DAS_SGLANG=1 in its environment) swaps in our drafts. Another algorithm is refused: our
  drafts would silently not run;
- --speculative-num-draft-tokens D (config.DEFAULT_DRAFT_WIDTH): SGLang's fixed verify width;
- --max-running-requests (--max-batch): explicit, or SGLang's NGRAM check resets it to 48;
- --speculative-ngram-capacity: small, since SGLang's own corpus stays empty under our worker
  (its trie preallocates that many nodes);
- --host, --port, --model-path, --served-model-name, --api-key from our settings.
Without speculation (--no-speculation, --spec-policy none) none of the NGRAM flags: plain
SGLang, the baseline.
Every setting goes into the environment as DAS_<FIELD> (flags included), where SGLang's
scheduler processes build their speculator from it (config.py). The gateway reaches the
server like any worker, by its URL (`das gateway --sglang-worker URL`); SGLang answers
/health itself.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence

from service.settings import Settings
from service.sglang_plugin import ENABLE_ENV
from service.sglang_plugin.config import DEFAULT_DRAFT_WIDTH, sglang_cost_model

NGRAM_CAPACITY = 4096  # nodes SGLang's (unused) corpus preallocates
PLUGIN_NAME = "das"  # our entry point's name in sglang.srt.plugins


def sglang_command(
    settings: Settings, extra: Sequence[str], python: str = sys.executable
) -> list[str]:
    """The SGLang server's command line. ValueError for settings it cannot run with. Without
    speculation (--no-speculation or --spec-policy none) it is plain SGLang, no NGRAM: the
    baseline our drafts are measured against."""
    speculating = settings.speculation_policy != "none"
    algorithm = _flag_value(extra, "--speculative-algorithm")
    if speculating:
        sglang_cost_model(settings.cost_model)  # refuse calibrate and the CPU preset up front
        if algorithm is not None and algorithm.upper() != "NGRAM":
            raise ValueError(
                f"--speculative-algorithm {algorithm}: our drafts go through NGRAM only"
            )
    elif algorithm is not None:
        raise ValueError("--speculative-algorithm with --no-speculation: choose one")
    command = [
        python,
        "-m",
        "sglang.launch_server",
        "--model-path",
        settings.model,
        "--host",
        settings.host,
        "--port",
        str(settings.port),
        "--max-running-requests",
        str(settings.max_batch),
    ]
    if speculating:
        command += [
            "--speculative-algorithm",
            "NGRAM",
            "--speculative-num-draft-tokens",
            str(DEFAULT_DRAFT_WIDTH),
            "--speculative-ngram-capacity",
            str(NGRAM_CAPACITY),
        ]
    if settings.served_model_name:
        command += ["--served-model-name", settings.served_model_name]
    if settings.api_key:
        command += ["--api-key", settings.api_key]
    return command + list(extra)


def sglang_env(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """`base` with the plugin switched on and every setting as its DAS_* variable."""
    env = dict(base)
    for name, value in settings.model_dump().items():
        key = f"DAS_{name.upper()}"
        if value is None:
            env.pop(key, None)
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        elif isinstance(value, list):
            env[key] = json.dumps(value)
        else:
            env[key] = str(value)
    env[ENABLE_ENV] = "1"
    allowed = env.get("SGLANG_PLUGINS")
    if allowed and PLUGIN_NAME not in {name.strip() for name in allowed.split(",")}:
        env["SGLANG_PLUGINS"] = f"{allowed},{PLUGIN_NAME}"  # SGLang's own filter keeps ours
    return env


def run_sglang_worker(settings: Settings, extra: Sequence[str]) -> int:
    """Become the SGLang server (does not return unless exec fails)."""
    command = sglang_command(settings, extra)
    env = sglang_env(settings, os.environ)
    os.execve(command[0], command, env)
    return 1  # not reached: execve raises OSError or never returns


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value given for `flag` (as `--flag V` or `--flag=V`), None if absent."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value
