"""Session defaults: without CUDA, Triton kernels run in the interpreter, and `gpu` tests are skipped.

TRITON_INTERPRET must be set before triton is first imported in the process, so it is set here,
the first file pytest loads (in every xdist worker too).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _grad_mode_is_not_leaked():
    """Global autograd state is process-wide: a test (or the code it runs) that turns gradients off breaks
    every later training test in the same worker, far from the cause. Fail at the cause instead."""
    yield
    assert torch.is_grad_enabled(), "this test left torch's global grad mode disabled"
