"""Fixtures for the model tests (one intra-op thread per test comes from tests/conftest.py)."""
import pytest
import torch

from dskc.model import Transformer, get_config, init_random


@pytest.fixture(scope="session")
def tiny_args():
    return get_config("tiny")


def poison_caches(model: Transformer) -> None:
    """Fill every KV cache with NaN so a read of an unwritten position shows in the logits."""
    for name, buf in model.named_buffers():
        if name.endswith("_cache"):
            buf.fill_(float("nan"))


@pytest.fixture
def make_tiny():
    """make_tiny(attn_impl="absorb", dtype=torch.float32, seed=0, args=None) -> initialised Transformer with NaN
    caches; args: ModelArgs overrides of the tiny config (its "dtype" is the weight format, bf16 or fp8)."""
    def make(attn_impl="absorb", dtype=torch.float32, seed=0, args=None):
        model = Transformer(get_config("tiny", **(args or {})), attn_impl, dtype=dtype)
        init_random(model, seed)
        poison_caches(model)
        return model
    return make
