"""What the vLLM worker checks before it hands a weight update to vLLM (a loader error inside
vLLM's engine core can leave the engine dead): a folder with weights and a config.json of the
model it serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.vllm_backend.worker import check_checkpoint

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30}


def checkpoint(folder: Path, config: dict[str, object] | None, weights: str | None) -> Path:
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (folder / weights).write_bytes(b"\0")
    return folder


def test_a_checkpoint_of_the_served_model_passes(tmp_path: Path) -> None:
    serving = checkpoint(tmp_path / "serving", CONFIG, "model.safetensors")
    check_checkpoint(
        checkpoint(tmp_path / "new", {**CONFIG, "torch_dtype": "bf16"}, "a.bin"), serving
    )


@pytest.mark.parametrize(
    ("config", "weights", "reason"),
    [
        (CONFIG, None, "no .safetensors"),
        (None, "model.safetensors", "config.json"),
        ({**CONFIG, "hidden_size": 1024}, "model.safetensors", "hidden_size"),
        ({**CONFIG, "architectures": ["Qwen2ForCausalLM"]}, "model.safetensors", "architectures"),
    ],
)
def test_anything_else_is_refused_before_vllm_sees_it(
    tmp_path: Path, config: dict[str, object] | None, weights: str | None, reason: str
) -> None:
    serving = checkpoint(tmp_path / "serving", CONFIG, "model.safetensors")
    with pytest.raises(ValueError, match=reason):
        check_checkpoint(checkpoint(tmp_path / "new", config, weights), serving)
    with pytest.raises(ValueError, match="not a folder"):
        check_checkpoint(tmp_path / "missing", serving)
