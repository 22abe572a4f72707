"""torch.compile(model, backend="dskc") on models not written for dskc: linears, what stays on Inductor and why,
options, a plain model, float32 and grad-mode graphs, a family's unsupported setting, transformers 4's expert list.
(The five tiny transformers models through both doors: test_backend_families.py; FP8: test_backend_fp8.py.)"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _hf_models import build
from dskc import compiler, knobs
from dskc.backend import DskcBackend
from dskc.lower.passes import Options

@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every torch.compile(module) here shares nn.Module's call code: its Dynamo cache entries would add up to the
    recompile limit (8), after which Dynamo runs eagerly without calling the backend."""
    torch._dynamo.reset()
    yield


needs_kernels = pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                   reason="needs a CUDA GPU or TRITON_INTERPRET=1")


class SwiGLU(nn.Module):
    """A SwiGLU MLP no family row describes (no act_fn to read): its linears lower one by one."""

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
    """Mixtral/DeepSeek-style MoE as popular model code writes it: softmax top-k and a loop over experts; its
    router (`k` and a plain linear) is in no row of the family table."""

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


def _check(model, x, rest, tol, **options):
    model = model.to(torch.bfloat16)
    ref = copy.deepcopy(model).float()(x.float()).double()
    backend = DskcBackend(rest=rest, **options)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
    return backend


@needs_kernels
def test_swiglu_mlp_lowers_every_linear_and_uses_inductor_for_the_rest():
    torch.manual_seed(1)
    b = _check(SwiGLU(), torch.randn(7, 128, dtype=torch.bfloat16), "inductor", 1e-2)
    assert [len(g.lowered) for g in b.graphs] == [3] and b.graphs[0].compiler == "inductor"
    assert "3 regions on dskc kernels (3 linears)" in b.report() and "w1" in b.report()


@needs_kernels
def test_sdpa_block_lowers_projections_and_reports_attention_and_bias():
    torch.manual_seed(2)
    b = _check(Attention(), torch.randn(2, 9, 128, dtype=torch.bfloat16), "aot_eager", 2e-2)
    g = b.graphs[0]
    assert g.lowered == ["qkv"]  # `o` has a bias
    reasons = " ".join(why for _, why in g.left)
    assert "SDPA" in reasons and "bias" in reasons


@needs_kernels
def test_moe_of_unknown_router_is_listed_and_never_half_lowered():
    torch.manual_seed(3)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        b = _check(LoopMoE(), torch.randn(11, 128, dtype=torch.bfloat16), "aot_eager", 2e-2)
    assert len(b.graphs) == 1 and b.graphs[0].lowered == []
    moe = next(r for r in b.regions() if r.kind == "moe")
    assert moe.family == "moe.unknown_router" and "router Linear" in moe.reason and not moe.lowered


def test_fp32_linears_are_left_with_a_reason_and_bad_options_refused():
    b = DskcBackend(rest="aot_eager")
    m = SwiGLU()
    x = torch.randn(3, 128)
    out = torch.compile(m, backend=b)(x)
    assert torch.allclose(out, m(x), atol=1e-5)
    assert b.graphs[0].lowered == [] and "bf16/fp16" in b.graphs[0].left[0][1]
    with pytest.raises(ValueError, match="rest"):
        DskcBackend(rest="tvm")
    with pytest.raises(ValueError, match="unknown"):
        DskcBackend(fp4=True)


def test_plain_model_with_nothing_to_lower_still_works_and_says_so():
    b = DskcBackend(rest="aot_eager")
    m = nn.Sequential(nn.Linear(128, 64, bias=True), nn.ReLU(), nn.Tanh())
    x = torch.randn(5, 128)
    assert torch.allclose(torch.compile(m, backend=b)(x), m(x), atol=1e-6)
    assert b.graphs[0].lowered == [] and "0 regions on dskc kernels" in b.report()
    b2 = DskcBackend(rest="aot_eager")
    torch.compile(nn.Sequential(nn.ReLU(), nn.Tanh()), backend=b2)(x)
    assert "nothing dskc lowers" in b2.report()


@needs_kernels
def test_registered_under_the_name_dskc_with_options():
    m = SwiGLU().to(torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        out = torch.compile(m, backend="dskc", options={"fp8": True, "rest": "aot_eager"})(x)
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    from dskc.backend import dskc_backend
    mine = [r for r in dskc_backend.regions() if r.path in ("w1", "w3", "w2")]
    assert {r.path: r.kind for r in mine if r.lowered} == {"w1": "fp8_linear", "w3": "fp8_linear"}
    assert "multiple of 128" in next(r.reason for r in mine if r.path == "w2")   # 192 wide: not whole blocks


def _qwen3_moe():
    return build("qwen3_moe").model.layers[1].mlp


@needs_kernels
def test_float32_regions_computed_in_bf16_only_when_asked_at_both_doors():
    block, x = _qwen3_moe(), torch.randn(1, 6, 128)
    with torch.no_grad():
        ref = block(x)
        left, asked = DskcBackend(rest="aot_eager"), DskcBackend(rest="aot_eager", compute_dtype="bf16")
        torch.compile(block, backend=left)(x)
        kept = left.regions()[0]
        torch._dynamo.reset()   # (which resets the backends' reports too)
        out = torch.compile(block, backend=asked)(x)
    assert not kept.lowered and "compute_dtype" in kept.reason
    rec = asked.regions()[0]
    assert rec.lowered and "float32 computed in bf16" in rec.reason and out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()) < 2e-2
    with pytest.raises(ValueError, match="compute_dtype"):
        compiler.compile(block, "sm90a", build_kernels=False, progress=False)
    cm = compiler.compile(block, "sm90a", build_kernels=False, progress=False, options=Options(compute_dtype="bf16"))
    assert cm.regions()[0].lowered and "computed in bf16" in cm.regions()[0].reason
    with torch.no_grad():
        assert ((cm(x) - ref).norm() / ref.norm()) < 2e-2


def test_graphs_needing_gradients_keep_their_regions_on_inductor():
    block, x = _qwen3_moe().to(torch.bfloat16), torch.randn(1, 6, 128, dtype=torch.bfloat16)
    b = DskcBackend(rest="aot_eager")
    out = torch.compile(block, backend=b)(x)
    out.float().sum().backward()   # the whole graph stayed differentiable
    rec = b.regions()[0]
    assert not rec.lowered and "gradients" in rec.reason and block.gate.weight.grad is not None


@needs_kernels
def test_unsupported_setting_of_a_known_family_is_listed_at_both_doors():
    block = build("deepseek_v3", hidden_act="gelu").model.layers[1].mlp.to(torch.bfloat16)
    x = torch.randn(1, 5, 128, dtype=torch.bfloat16)
    b = DskcBackend(rest="aot_eager")
    with torch.no_grad():
        torch.compile(block, backend=b)(x)
    moe = b.regions()[0]
    assert moe.kind == "moe" and not moe.lowered and "activation" in moe.reason
    assert not [r for r in b.regions() if r.lowered]   # its shared experts' linears stay with it
    with pytest.raises(ValueError, match="activation"):   # nothing else to lower: dskc.compile says why
        compiler.compile(block, "sm90a", build_kernels=False, progress=False)


class Experts4(nn.Module):
    """transformers 4's MixtralBlockSparseTop2MLP."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.w1, self.w3, self.w2 = (nn.Linear(gate.shape[1], gate.shape[0], bias=False) for _ in range(3))
        self.w2 = nn.Linear(down.shape[1], down.shape[0], bias=False)
        with torch.no_grad():
            self.w1.weight.copy_(gate), self.w3.weight.copy_(up), self.w2.weight.copy_(down)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class Mixtral4(nn.Module):
    """transformers 4's MixtralSparseMoeBlock (a plain linear gate, top_k on the block, a ModuleList of experts)."""

    def __init__(self, block):
        super().__init__()
        self.top_k, self.gate = 2, nn.Linear(128, 4, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(block.gate.weight)
        ex = block.experts
        self.experts = nn.ModuleList(Experts4(*ex.gate_up_proj[e].chunk(2), ex.down_proj[e]) for e in range(4))

    def forward(self, x):
        b, s, h = x.shape
        x = x.view(-1, h)
        w, idx = F.softmax(self.gate(x), dim=1, dtype=torch.float).topk(self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        y = torch.zeros_like(x)
        mask = F.one_hot(idx, num_classes=4).permute(2, 1, 0)
        for e in range(4):
            slot, tok = torch.where(mask[e])
            y.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return y.view(b, s, h)


@needs_kernels
def test_transformers4_expert_list_through_both_doors():
    block = Mixtral4(build("mixtral").model.layers[0].mlp).to(torch.bfloat16)
    x = torch.randn(1, 7, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    with torch.no_grad():
        ref, eager = copy.deepcopy(block).float()(x.float()).double(), block(x).double()
        b = DskcBackend(rest="aot_eager")
        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            fx_out = torch.compile(block, backend=b, fullgraph=True)(x).double()
        mod_out = compiler.compile(block, "sm90a", build_kernels=False, progress=False)(x).double()
    bound = 2 * ((eager - ref).norm() / ref.norm()) + 1e-3
    rec = b.regions()[0]
    assert rec.family == "transformers4.mixtral.moe" and rec.lowered
    assert ((fx_out - ref).norm() / ref.norm()) <= bound and ((mod_out - ref).norm() / ref.norm()) <= bound
