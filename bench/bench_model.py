"""End-to-end eager model on the CPU: tiny config, prefill (batch 2 x 64 tokens) and one decode step.

Run: .venv/bin/python -m pytest bench/bench_model.py --benchmark-enable -q
One intra-op thread: on the shared 2-core box two threads made small matmuls ~40x slower (oversubscription).
"""
import pytest
import torch

from dskc.model import Transformer, get_config, init_random

BATCH, PROMPT = 2, 64


@pytest.fixture(scope="module")
def tiny_models():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    models = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = Transformer(get_config("tiny"), "absorb", dtype=dtype)
        init_random(model, 0)
        models[dtype] = model
    yield models
    torch.set_num_threads(before)


def _tokens():
    return torch.randint(0, 1024, (BATCH, PROMPT + 1), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_prefill(benchmark, tiny_models, dtype):
    model, tokens = tiny_models[dtype], _tokens()
    logits = benchmark.pedantic(model, args=(tokens[:, :PROMPT],), rounds=5, warmup_rounds=1)
    assert logits.shape == (BATCH, 1024) and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_step(benchmark, tiny_models, dtype):
    model, tokens = tiny_models[dtype], _tokens()
    model(tokens[:, :PROMPT])
    logits = benchmark.pedantic(model, args=(tokens[:, PROMPT:], PROMPT), rounds=10, warmup_rounds=1)
    assert logits.shape == (BATCH, 1024) and torch.isfinite(logits).all()
