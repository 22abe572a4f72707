"""Fixtures for every test tier."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: on the 2-core CI box shared with other jobs, two threads made a 128x256x512
    matmul ~40x slower (48 ms vs 1.2 ms measured) through oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
