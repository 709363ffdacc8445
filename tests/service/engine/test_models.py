from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from service.engine.models import (
    TINY_RANDOM,
    Tokenizer,
    converted_gguf_dir,
    load_model,
    smollm2_gguf_path,
    tiny_random_model,
)


def test_tiny_random_is_seeded_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b = tiny_random_model(), tiny_random_model()
    assert torch.equal(torch.random.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.lm_head.weight, tiny_random_model(seed=1).lm_head.weight)


def test_load_tiny_random_has_no_tokenizer() -> None:
    model, tokenizer = load_model(TINY_RANDOM)
    config: Any = model.config
    assert tokenizer is None
    assert config.model_type == "llama" and not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_load_model_rejects_unknown_names_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        load_model("no-such-model")
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        load_model(str(weights))


def test_load_model_from_a_directory_without_tokenizer(tmp_path: Path) -> None:
    tiny_random_model().save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert tokenizer is None
    for loaded, built in zip(model.parameters(), tiny_random_model().parameters(), strict=True):
        torch.testing.assert_close(loaded, built)


def test_converted_gguf_is_reused_from_the_cache(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    stat = gguf.stat()
    cached = tmp_path / "cache" / f"m-{stat.st_size}-{stat.st_mtime_ns}"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert converted_gguf_dir(gguf, tmp_path / "cache") == cached
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a new file: a new key
    with pytest.raises(Exception):  # noqa: B017 - converting the fake file must be tried
        converted_gguf_dir(gguf, tmp_path / "cache")


@pytest.mark.slow
def test_smollm2_loads_with_its_tokenizer_and_chat_template(
    smollm2: tuple[torch.nn.Module, Tokenizer],
) -> None:
    model, tokenizer = smollm2
    config: Any = model.config
    assert smollm2_gguf_path().suffix == ".gguf"
    assert config.num_hidden_layers == 30 and config.vocab_size == 49152
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert ids.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_id == 2
