"""Test stub for torchvision, whose PyPI builds do not match this CPU torch.

SGLang's multimodal helpers import torchvision.transforms at module level; the text-only code
under test never calls it. Any attribute is a placeholder that raises when used. conftest.py
makes transformers cache is_torchvision_available() as False before this folder is on
sys.path, so transformers never takes the stub for the real package. tests/sglang only.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.0.0+stub"


class _Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._name} is a test stub: torchvision is not installed")

    def __getattr__(self, attr: str) -> _Missing:
        return _Missing(f"{self._name}.{attr}")


def __getattr__(name: str) -> _Missing:
    return _Missing(f"torchvision.{name}")
