"""How the gateway talks to an SGLang worker (`das gateway --sglang-worker URL`).

SGLang serves the same generation paths and the same control names as our workers; what
differs, and is translated here (pure functions; service/gateway.py calls them):
- the prompt group: our workers read the body's `prompt_group` (or X-Session-ID); SGLang
  carries it in `custom_params` (top level for /v1/completions and /v1/chat/completions,
  inside `sampling_params` for /generate), where our worker plugin reads
  custom_params["prompt_group"]. Without an explicit group nothing is added, and the plugin
  hashes the prompt's token ids, as our workers do;
- /pause_generation: ours pauses in place; SGLang's default mode aborts the running requests,
  so an empty body becomes {"mode": "in_place"};
- /continue_generation: SGLang requires a JSON body ({} when none was sent);
- the weight version: SGLang has no /get_weight_version; GET /model_info carries it (the
  gateway reads it after each health check). SGLang moves it only when an update names one,
  so every update the gateway sends an SGLang worker names the version it is to reach
  (update_body); SGLang's start-up "default" is version 0, as our workers start.
"""

from __future__ import annotations

import json
from typing import Any

from service.sglang_plugin.drafting import GROUP_PARAM

WEIGHT_VERSION_PATH = "/model_info"  # SGLang's; its "weight_version" field


def generation_body(path: str, body: dict[str, Any], group: str | None) -> bytes:
    """A generation body as SGLang takes it: prompt_group moved into custom_params (into each
    of a batched /generate's sampling_params)."""
    out = dict(body)
    out.pop("prompt_group", None)
    if group:
        if path != "/generate":
            out = _with_group(out, group)
        elif isinstance(out.get("sampling_params"), list):
            out["sampling_params"] = [
                _with_group(p if isinstance(p, dict) else {}, group) for p in out["sampling_params"]
            ]
        else:
            sampling = out.get("sampling_params")
            out["sampling_params"] = _with_group(
                sampling if isinstance(sampling, dict) else {}, group
            )
    return json.dumps(out).encode()


def _with_group(holder: dict[str, Any], group: str) -> dict[str, Any]:
    params = holder.get("custom_params")
    merged = dict(params) if isinstance(params, dict) else {}
    merged[GROUP_PARAM] = group
    return {**holder, "custom_params": merged}


def control_body(path: str, body: bytes) -> bytes:
    """A control call's body as SGLang takes it."""
    if path == "/pause_generation" and not body.strip():
        return b'{"mode": "in_place"}'
    if path == "/continue_generation" and not body.strip():
        return b"{}"
    return body


SGLANG_START_VERSION = "default"  # SGLang's weight_version before any update names one


def weight_version(model_info: Any) -> str:
    """The weight version in SGLang's /model_info reply ("" if it has none; "0" for SGLang's
    start-up "default", the version our workers start at)."""
    version = model_info.get("weight_version") if isinstance(model_info, dict) else None
    if version == SGLANG_START_VERSION:
        return "0"
    return "" if version is None else str(version)


def update_body(body: bytes, announced: str | None) -> bytes:
    """A weight update as SGLang takes it: naming the version to reach, as a string (SGLang
    keeps its version when none is named, so a worker that missed an update would look the
    same as the others): the one given, else the one after `announced` (1 with none yet)."""
    try:
        update = json.loads(body)
    except (ValueError, RecursionError):
        return body  # SGLang answers the malformed body itself
    if not isinstance(update, dict):
        return body
    version = update.get("weight_version")
    if version is None:
        version = int(announced) + 1 if announced is not None and announced.isdecimal() else 1
    return json.dumps({**update, "weight_version": str(version)}).encode()


def version_order(version: str) -> tuple[int, int, str]:
    """A sort key for weight versions from any worker: numbers by value, above any other
    string (SGLang's default version is "default")."""
    return (1, int(version), "") if version.isdecimal() else (0, 0, version)
