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
def _one_torch_thread():
    """Every test runs torch on one thread. The tests' tensors are small, and on a shared 2-core machine
    (and under `pytest -n 2`) torch's OpenMP pool oversubscribes the cores: measured here, the CPU attention
    tests took 181 s with 2 threads under load and 9 s with 1; tiny training steps ran ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _grad_mode_is_not_leaked():
    """Global autograd state is process-wide: a test (or the code it runs) that turns gradients off breaks
    every later training test in the same worker, far from the cause. Fail at the cause instead."""
    yield
    assert torch.is_grad_enabled(), "this test left torch's global grad mode disabled"
