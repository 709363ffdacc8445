from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from service.engine.models import Tokenizer, load_model, tiny_random_model


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    # The machine has two cores and is shared: keep one free.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model() -> torch.nn.Module:
    return tiny_random_model()


@pytest.fixture(scope="session")
def smollm2() -> tuple[torch.nn.Module, Tokenizer]:
    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


def counting_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """Two chat prompts (as token ids) whose answers repeat a pattern: drafts get accepted."""
    messages = [
        [{"role": "user", "content": f"Count from {i} to {i + 20}, comma separated."}]
        for i in (1, 7)
    ]
    return [
        list(
            tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)[
                "input_ids"
            ]
        )
        for m in messages
    ]
