"""FP8 weights asked for (backend option fp8=True, Options(quantize_weights=True) for dskc.compile): the regions of
transformers' tiny models run fp8 grouped GEMMs / fp8_gemm_1d2d on weights quantised at compile time with DeepSeek's
128x128 recipe, and stay within 2e-2 of the same recipe written in eager PyTorch (weights and 1x128 activations
quantised identically, everything else float32) on identical inputs, region by region."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _hf_models import build
from dskc import compiler, knobs
from dskc.backend import DskcBackend
from dskc.lower.passes import Options
from dskc.model import quantize_weight, weight_dequant
from dskc.model.fp8 import act_quant_dequant
from dskc.ops import moe_block as moe_ops   # fused_moe: its grouped GEMMs are launched from here

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not knobs.get().triton_interpret,
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and not knobs.get().triton_interpret else "cpu"


def qw(w):
    q, s = quantize_weight(w.float())
    return weight_dequant(q, s, torch.float32)


def lin(x, w):
    """The FP8 GEMM's math: x quantised 1x128, w 128x128, products summed in float32."""
    return act_quant_dequant(x.float()) @ qw(w).t()


def mlp(x, gate, up, down):
    return lin(F.silu(lin(x, gate)) * lin(x, up), down)


def mlp_of(m, x):
    return mlp(x, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)


def moe_reference(block, x):
    """The block's own router (float32) picks experts and weights; each expert's MLP in the FP8 recipe."""
    ref = copy.deepcopy(block).float()
    x2 = x.reshape(-1, x.shape[-1]).float()
    _, weights, ids = ref.gate(x2)
    ex = ref.experts
    y = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = ex.gate_up_proj[e].chunk(2)
            y[t] += weights[t, j].float() * mlp(x2[t:t + 1], gate, up, ex.down_proj[e])[0]
    if hasattr(ref, "shared_experts"):
        y += mlp_of(ref.shared_experts, x2)
    if hasattr(ref, "shared_expert"):
        y += torch.sigmoid(x2 @ ref.shared_expert_gate.weight.t()) * mlp_of(ref.shared_expert, x2)
    return y.view(x.shape)


class Wrap(nn.Module):
    """The region as a child (Dynamo tags the compiled root's own code with no module)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


def _rel(a, ref) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


CASES = [  # model, region, its kind, reference, kernels it must launch
    ("deepseek_v3", "model.layers.1.mlp", "moe", moe_reference, {"grouped_gemm", "moe_permute"}),
    ("qwen2_moe", "model.layers.1.mlp", "moe", moe_reference, {"grouped_gemm", "act_quant", "fp8_gemm_1d2d"}),
    ("mixtral", "model.layers.0.mlp", "moe", moe_reference, {"grouped_gemm", "moe_permute"}),
    ("deepseek_v3", "model.layers.0.mlp", "mlp", mlp_of, {"fp8_gemm_1d2d", "act_quant"}),
    ("deepseek_v3", "model.layers.0.self_attn.kv_a_proj_with_mqa", "fp8_linear", lambda m, x: lin(x, m.weight),
     {"fp8_gemm_1d2d", "act_quant"}),
]


@pytest.mark.parametrize("name,path,kind,reference,kernels", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_fp8_region_matches_the_same_recipe_in_eager_pytorch(name, path, kind, reference, kernels, monkeypatch):
    torch._dynamo.reset()
    region = build(name).get_submodule(path).to(torch.bfloat16).to(DEV)
    x = torch.randn(1, 9, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEV)
    backend = DskcBackend(rest="aot_eager", fp8=True)
    seen = []   # the weight dtype of every grouped GEMM the MoE launches
    real = moe_ops.grouped_gemm
    monkeypatch.setattr(moe_ops, "grouped_gemm", lambda a, sa, b, *r, **k: seen.append(b.dtype) or real(a, sa, b, *r, **k))
    with torch.no_grad():
        got = torch.compile(Wrap(region), backend=backend, dynamic=True, fullgraph=True)(x)
        ref = reference(region, x)
    rec = next(r for r in backend.regions() if r.kind == kind)
    assert rec.lowered and kernels <= set(rec.kernels) and "FP8" in rec.reason, rec
    assert set(seen) == ({torch.float8_e4m3fn} if kind == "moe" else set())
    assert got.dtype == x.dtype and _rel(got, ref) < 2e-2, _rel(got, ref)


def test_fp8_moe_through_dskc_compile_matches_the_recipe_too():
    region = build("deepseek_v3").get_submodule("model.layers.1.mlp").to(torch.bfloat16).to(DEV)
    x = torch.randn(1, 9, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEV)
    cm = compiler.compile(Wrap(region), "sm90a" if DEV == "cpu" else "auto", build_kernels=False, progress=False,
                          options=Options(quantize_weights=True))
    rec = next(r for r in cm.regions() if r.kind == "moe")
    assert rec.lowered and "grouped_gemm" in rec.kernels and "FP8" in rec.reason
    with torch.no_grad():
        assert _rel(cm(x), moe_reference(region, x)) < 2e-2
