"""GPU tier: the tiny model on CUDA in bfloat16 against the CPU float32 model (skipped without a GPU)."""
import pytest
import torch

from dskc.model import Transformer, generate, get_config, init_random

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _model(attn_impl, dtype, device):
    model = Transformer(get_config("tiny"), attn_impl, dtype=dtype, device=device)
    return init_random(model, 12)


def _steps(model, tokens):
    """Prefill 33 tokens, then 8 single-token decode steps: logits [9, bsz, vocab] on the CPU."""
    dev = model.rope.device
    for name, buf in model.named_buffers():
        if name.endswith("_cache"):
            buf.fill_(float("nan"))
    out = [model(tokens[:, :33].to(dev))] + [model(tokens[:, p:p + 1].to(dev), p) for p in range(33, 41)]
    assert all(o.dtype == torch.float32 and o.device == dev for o in out)
    return torch.stack(out).cpu()


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_cuda_matches_cpu(attn_impl):
    """float32 on CUDA equals the CPU closely; bfloat16 stays similar (rounding may flip a few routings)."""
    tokens = torch.randint(0, 1024, (3, 41), generator=torch.Generator().manual_seed(0))
    want = _steps(_model(attn_impl, torch.float32, "cpu"), tokens)
    torch.testing.assert_close(_steps(_model(attn_impl, torch.float32, "cuda"), tokens), want,
                               atol=2e-3, rtol=2e-3)
    sim = torch.nn.functional.cosine_similarity(_steps(_model(attn_impl, torch.bfloat16, "cuda"), tokens),
                                                want, dim=-1)
    assert sim.mean() > 0.98 and sim.min() > 0.85, sim


def test_cuda_generate_runs():
    gpu = _model("absorb", torch.bfloat16, "cuda")
    out = generate(gpu, [[1, 2, 3], [4, 5]], max_new_tokens=5, temperature=0.7, seed=1)
    assert [len(o) for o in out] == [5, 5] and all(0 <= t < 1024 for o in out for t in o)
