"""Test stub (see torchvision/__init__.py): every attribute is a placeholder that raises."""

from __future__ import annotations

from torchvision import _Missing


def __getattr__(name: str) -> _Missing:
    return _Missing(f"torchvision.transforms.{name}")
