import pytest
import torch

from dskc.model import Transformer, get_config, init_random
from dskc.model.fp8 import act_quant_dequant


def test_act_quant_dequant_matches_float64_recipe():
    x = torch.randn(5, 384, dtype=torch.float64) * torch.logspace(-3, 2, 384, dtype=torch.float64)
    blocks = x.view(5, 3, 128)
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
    expect = ((blocks / scale).to(torch.float8_e4m3fn).double() * scale).view(5, 384)
    got = act_quant_dequant(x.float())
    assert torch.allclose(got.double(), expect, rtol=1e-6, atol=0)
    assert not torch.equal(got, x.float())  # it really rounds


def test_act_quant_dequant_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 128"):
        act_quant_dequant(torch.randn(2, 200))


def test_gemm_impl_fp8_changes_only_fp8_linears():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    a = Transformer(cfg, dtype=torch.float32)
    init_random(a, 1)
    b = Transformer(cfg, dtype=torch.float32, gemm_impl="fp8")
    b.load_state_dict(a.state_dict())
    assert all(m.quantize_activations for n, m in b.named_modules() if getattr(m, "scale", None) is not None)
    assert not b.head.quantize_activations  # the head is bf16 in DeepSeek's checkpoints
    tok = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.inference_mode():
        la, lb = a(tok), b(tok)
    rel = ((la - lb).norm() / la.norm()).item()
    assert 0 < rel < 0.5
    with pytest.raises(ValueError, match="gemm_impl"):
        Transformer(cfg, gemm_impl="int4")
