"""End-to-end eager model on the CPU: tiny config, prefill (batch 2 x 64 tokens) and one decode step; on a GPU,
transformers' DeepSeek-V3 layer through torch.compile(backend="dskc") next to backend="inductor".

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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the transformers DeepSeek-V3 layer bench needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["dskc", "inductor"])
def test_transformers_deepseek_v3_layer_prefill(benchmark, backend):
    """transformers' DeepseekV3ForCausalLM (one full-width layer, random bf16 weights) through
    torch.compile(backend=...): prefill tokens/s of batch 1 x 1024 (dskc.benchmark.hf_model's GPU case)."""
    transformers = pytest.importorskip("transformers")
    from dskc.benchmark.hf_model import V3_LAYER

    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**V3_LAYER))
    model = torch.compile(model.to(torch.bfloat16).eval(), backend=backend, dynamic=True)
    tokens = torch.randint(0, 1000, (1, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    @torch.no_grad()
    def run():
        out = model(tokens, use_cache=False).logits
        torch.cuda.synchronize()
        return out

    run()  # compile outside the timing
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    mean = benchmark.stats.stats.mean if benchmark.stats else float("nan")
    benchmark.extra_info.update(backend=backend, tokens_per_s=tokens.numel() / mean)
