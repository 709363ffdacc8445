from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from service.engine.models import tiny_random_model


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
