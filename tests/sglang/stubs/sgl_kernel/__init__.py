"""Test stub for SGLang's compiled kernel package, which has no build for this CPU.

Only what the modules under test import: sgl_kernel.speculative's
reconstruct_indices_from_tree_mask, as a plain torch reference. Used by tests/sglang only
(conftest.py puts this folder on sys.path); nothing here runs in a real worker.
"""
