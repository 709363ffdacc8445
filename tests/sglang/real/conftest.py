"""Tests against SGLang 0.5.23's real code, on a CPU with no sgl_kernel and no GPU.

Before sglang is imported: TRITON_INTERPRET=1 (SGLang's Triton kernels run in Triton's
interpreter on CPU tensors), transformers caches is_torchvision_available() as False, and
then ../stubs goes on sys.path (a torchvision whose attributes raise, and sgl_kernel's
reconstruct_indices_from_tree_mask as a torch reference: the two modules that SGLang imports
and that have no build for this machine). Nothing of the stubs runs in a real worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers.utils.import_utils as _transformers_imports

_transformers_imports.is_torchvision_available()  # cached False before the stub is visible
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "stubs"))
