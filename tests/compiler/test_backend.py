"""torch.compile(model, backend="dskc") on models not written for dskc."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dskc.backend import DskcBackend


class SwiGLU(nn.Module):
    def __init__(self, d=128, i=192):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False)
        self.w2 = nn.Linear(i, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, d=128, heads=4):
        super().__init__()
        self.heads, self.qkv, self.o = heads, nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=True)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, d))


class LoopMoE(nn.Module):
    """Mixtral/DeepSeek-style MoE as popular model code writes it: softmax top-k and a loop over experts."""

    def __init__(self, d=128, n=4, k=2):
        super().__init__()
        self.k, self.gate = k, nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, 128) for _ in range(n))

    def forward(self, x):
        w, idx = self.gate(x).softmax(-1).topk(self.k, dim=-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            y.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return y


def _check(model, x, rest, tol):
    torch.manual_seed(0)
    model = model.to(torch.bfloat16)
    ref = model.double()(x.double()) if not isinstance(model, Attention) else None
    model = model.to(torch.bfloat16)
    if ref is None:
        ref = model.float()(x.float()).double()
        model = model.to(torch.bfloat16)
    backend = DskcBackend(rest=rest)
    out = torch.compile(model, backend=backend)(x)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
    return backend


def test_swiglu_mlp_lowers_every_linear_and_uses_inductor_for_the_rest():
    torch.manual_seed(1)
    b = _check(SwiGLU(), torch.randn(7, 128, dtype=torch.bfloat16), "inductor", 1e-2)
    assert [len(g.lowered) for g in b.graphs] == [3] and b.graphs[0].compiler == "inductor"
    assert "3 linears on dskc kernels" in b.report()


def test_sdpa_block_lowers_projections_and_reports_attention_and_bias():
    torch.manual_seed(2)
    b = _check(Attention(), torch.randn(2, 9, 128, dtype=torch.bfloat16), "aot_eager", 2e-2)
    g = b.graphs[0]
    assert len(g.lowered) == 1  # qkv; `o` has a bias
    reasons = " ".join(why for _, why in g.left)
    assert "SDPA" in reasons and "bias" in reasons


def test_loop_moe_captured_whole_with_dynamic_output_shapes():
    torch.manual_seed(3)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        b = _check(LoopMoE(), torch.randn(11, 128, dtype=torch.bfloat16), "aot_eager", 2e-2)
    assert len(b.graphs) == 1 and len(b.graphs[0].lowered) == 1 + 3 * 4  # gate + each expert's w1, w3, w2
    assert any("torch.where" in why for _, why in b.graphs[0].left)


def test_loop_moe_with_graph_breaks_stays_correct():
    torch.manual_seed(4)
    torch._dynamo.reset()
    b = _check(LoopMoE(), torch.randn(11, 128, dtype=torch.bfloat16), "aot_eager", 2e-2)
    assert b.graphs and sum(len(g.lowered) for g in b.graphs) >= 1


def test_fp32_linears_are_left_with_a_reason():
    b = DskcBackend(rest="aot_eager")
    m = SwiGLU()
    x = torch.randn(3, 128)
    out = torch.compile(m, backend=b)(x)
    assert torch.allclose(out, m(x), atol=1e-5)
    assert b.graphs[0].lowered == [] and "bf16/fp16" in b.graphs[0].left[0][1]
    with pytest.raises(ValueError, match="rest"):
        DskcBackend(rest="tvm")


def test_registered_under_the_name_dskc():
    m = SwiGLU().to(torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    out = torch.compile(m, backend="dskc")(x)
    assert out.shape == (2, 128) and torch.isfinite(out).all()
