"""The engine tests' fixtures: one torch thread, the tiny random model."""

from tests.service.engine.conftest import one_thread, tiny_model

__all__ = ["one_thread", "tiny_model"]
