"""The family table: which row recognises each module of transformers' tiny DeepSeek-V3/V2, Qwen3/2-MoE and
Mixtral models and of dskc's own model (no kernels run: meta models and plain PyTorch), what it reads, why it
refuses a setting, and that its weight layouts hold the module's own weights (checked against the module's math).
"""
import pytest
import torch
import torch.nn as nn

from _hf_models import FAMILY, NAMES, build, expected_regions
from dskc.capture import layouts
from dskc.capture.families import FAMILIES, classify
from dskc.capture.regions import find_regions
from dskc.ir.graph import Op
from dskc.model import Transformer, get_config


def _nodes(model):
    return {n.name: n for n in find_regions(model).nodes}


@pytest.mark.parametrize("name", NAMES)
def test_every_moe_mlp_and_mla_of_a_tiny_model_is_a_region_of_its_family(name):
    model = build(name, device="meta")
    nodes = _nodes(model)
    for path, kind in expected_regions(model).items():
        n = nodes[path]
        assert n.op.value == kind, (path, n)
        if kind == "moe":
            assert n.attr("family").startswith(FAMILY[name]), n
        if kind == "mla":
            assert n.attr("family") == f"{FAMILY[name]}.mla" and n.attr("kv_lora_rank") == 512
    # routers, experts and the absorbed kv_b are folded into their regions, never linears of their own
    for path in nodes:
        assert not path.endswith((".gate", ".experts", ".kv_b_proj", ".shared_expert_gate")), path
        assert ".experts." not in path and ".shared_expert" not in path, path
    assert nodes["lm_head"].op is Op.LINEAR


def test_routers_read_as_their_family_routes():
    v3 = _nodes(build("deepseek_v3", device="meta"))["model.layers.1.mlp"]
    assert (v3.attr("score_func"), v3.attr("gate_bias"), v3.attr("n_groups"), v3.attr("topk_groups"),
            v3.attr("renorm"), v3.attr("route_scale"), v3.attr("shared_inter")) == ("sigmoid", True, 2, 1, True, 2.5,
                                                                                      128)
    v2 = _nodes(build("deepseek_v2", device="meta"))["model.layers.1.mlp"]
    assert (v2.attr("score_func"), v2.attr("gate_bias"), v2.attr("n_groups"), v2.attr("renorm"),
            v2.attr("route_scale")) == ("softmax", False, 2, False, 1.5)
    greedy = _nodes(build("deepseek_v2", device="meta", topk_method="greedy"))["model.layers.1.mlp"]
    assert greedy.attr("n_groups") == 1
    q3 = _nodes(build("qwen3_moe", device="meta"))["model.layers.1.mlp"]
    assert (q3.attr("renorm"), q3.attr("shared"), q3.attr("n_experts")) == (True, False, 8)
    q2 = _nodes(build("qwen2_moe", device="meta"))["model.layers.1.mlp"]
    assert (q2.attr("renorm"), q2.attr("shared"), q2.attr("shared_gate")) == (False, True, True)
    mx = _nodes(build("mixtral", device="meta"))["model.layers.0.mlp"]
    assert (mx.attr("renorm"), mx.attr("top_k"), mx.attr("n_experts")) == (True, 2, 4)


@pytest.mark.parametrize("name,over,path,reason", [
    ("deepseek_v3", dict(hidden_act="gelu"), "model.layers.1.mlp", "activation"),
    ("deepseek_v3", dict(hidden_act="gelu"), "model.layers.0.mlp", "activation"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), "model.layers.1.mlp", "topk_method"),
    ("deepseek_v3", dict(kv_lora_rank=256), "model.layers.0.self_attn", "512"),
    ("deepseek_v3", dict(attention_bias=True), "model.layers.0.self_attn", "bias"),
    ("qwen2_moe", {}, "model.layers.0.self_attn.q_proj", "bias"),
])
def test_a_known_family_with_an_unsupported_setting_is_listed_with_its_reason(name, over, path, reason):
    nodes = _nodes(build(name, device="meta", **over))
    n = nodes[path]
    assert n.op is Op.FALLBACK and reason in n.attr("reason"), n
    if n.attr("kind") in ("moe", "mlp"):   # never half-lowered: nothing inside it is a region
        assert not [p for p in nodes if p.startswith(path + ".")]


class LoopMoE(nn.Module):
    """A MoE whose router no row describes (softmax top-k on a plain linear, `k` as its only fact)."""

    def __init__(self, d=128, n=4):
        super().__init__()
        self.k, self.gate = 2, nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n))


def test_an_unknown_router_is_listed_and_its_linears_stay_eager():
    model = nn.Sequential(LoopMoE(), nn.Linear(128, 128, bias=False))
    nodes = _nodes(model)
    assert nodes["0"].op is Op.FALLBACK and nodes["0"].attr("family") == "moe.unknown_router"
    assert "router Linear" in nodes["0"].attr("reason") and set(nodes) == {"0", "1"}


def test_dskc_models_regions_are_the_same_rows_as_before():
    """dskc's own model is one family of the table: blocks, MLA with its projections, MLP / MoE, norms."""
    nodes = _nodes(Transformer(get_config("tiny"), device="meta"))
    assert nodes["layers.0"].attr("family") == "dskc.block" and nodes["layers.0.attn"].attr("family") == "dskc.mla"
    assert nodes["layers.0.ffn"].op is Op.MLP and nodes["layers.2.ffn"].op is Op.MOE
    assert nodes["layers.2.ffn"].attr("family") == "dskc.moe" and nodes["layers.0.attn.wkv_b"].op is Op.FP8_LINEAR
    assert not [p for p in nodes if ".experts." in p or p.endswith(".gate") or ".shared_experts" in p]
    assert [f.name for f in FAMILIES][-2:] == ["linear", "dskc.rmsnorm"]   # the catch-alls come last


def _swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe", "mixtral"])
def test_moe_layout_holds_each_experts_weights(name):
    """w13[e] = [gate_e; up_e], w2[e] = down_e; the shared expert's MLP and Qwen2's shared gate; FP8 quantisation
    per expert (128x128 blocks) dequantises to within e4m3's step of the weights."""
    model = build(name)
    moe = model.model.layers[1].mlp
    _, spec = classify(moe)
    w = layouts.layout(moe, spec, False, torch.float32)
    ex = moe.experts
    x = torch.randn(5, 128)
    for e in range(spec.n_experts):
        gate, up = ex.gate_up_proj[e].chunk(2)
        torch.testing.assert_close(_swiglu(x, w.w13[e, :spec.inter], w.w13[e, spec.inter:], w.w2[e]),
                                   _swiglu(x, gate, up, ex.down_proj[e]))
    assert torch.equal(w.gate, moe.gate.weight.float())
    if name == "qwen2_moe":
        assert torch.equal(w.shared_gate, moe.shared_expert_gate.weight)
        torch.testing.assert_close(_swiglu(x, *w.shared.up.weight.chunk(2), w.shared.down.weight), moe.shared_expert(x))
    q = layouts.layout(moe, spec, True, torch.float32)
    assert q.w13.dtype == torch.float8_e4m3fn and q.w13_scale.shape == (spec.n_experts, 2, 1)
    from dskc.model.fp8 import weight_dequant
    back = torch.stack([weight_dequant(q.w13[e], q.w13_scale[e], torch.float32) for e in range(spec.n_experts)])
    assert ((back - w.w13).abs() <= w.w13.abs() / 16 + 1e-6).all()


class Experts4(nn.Module):
    """transformers 4's per-expert MLP (MixtralBlockSparseTop2MLP: w1 / w3 / w2 + act_fn)."""

    def __init__(self, gate, up, down):
        super().__init__()
        self.w1, self.w3, self.w2 = (nn.Linear(1, 1, bias=False) for _ in range(3))
        self.w1.weight, self.w3.weight, self.w2.weight = (nn.Parameter(t.clone()) for t in (gate, up, down))
        self.act_fn = nn.SiLU()


def test_transformers4_expert_list_lays_out_like_the_stacked_tensors():
    model = build("mixtral")
    moe = model.model.layers[0].mlp
    _, fused = classify(moe)
    stacked = layouts.layout(moe, fused, False, torch.float32)
    ex = moe.experts
    moe.experts = nn.ModuleList(Experts4(*ex.gate_up_proj[e].chunk(2), ex.down_proj[e]) for e in range(4))
    family, listed = classify(moe)
    assert listed.experts.layout == "list" and listed.experts.names == ("w1", "w3", "w2")
    w = layouts.layout(moe, listed, False, torch.float32)
    assert torch.equal(w.w13, stacked.w13) and torch.equal(w.w2, stacked.w2)


def test_mla_layout_splits_kv_b_into_the_absorbed_weights():
    model = build("deepseek_v3")
    attn = model.model.layers[0].self_attn
    _, spec = classify(attn)
    w = layouts.layout(attn, spec, False, torch.float32)
    kv_b = attn.kv_b_proj.weight.view(2, 64, 512)
    assert torch.equal(w.w_uk, kv_b[:, :32]) and torch.equal(w.w_uv, kv_b[:, 32:])
    assert spec.rope == "interleave" and spec.scale == attn.scaling and spec.names["q_a"] == "q_a_proj"
    _, v2 = classify(build("deepseek_v2", device="meta").model.layers[0].self_attn)
    assert v2.rope == "complex" and v2.names["q"] == "q_proj"
