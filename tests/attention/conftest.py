"""Attention tests run torch on one thread.

Their tensors are small, and on a shared 2-core machine (and under `pytest -n 2`) torch's OpenMP pool
oversubscribes the cores: measured here, the CPU attention tests took 181 s with 2 threads under load
and 9 s with 1. The previous thread count is restored after each test.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
