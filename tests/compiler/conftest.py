import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # On a loaded 2-core machine two torch threads make small matmuls far slower (see tests/model/conftest.py).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
