"""Capture -> IR -> passes -> selection, on the tiny and deepseek-v2-lite models (no weights needed: meta)."""
import collections

import pytest
import torch
import torch.nn as nn

from dskc import compiler
from dskc.capture.regions import find_regions
from dskc.ir.graph import Graph, Node, Op, VerifyError, verify
from dskc.lower.passes import PASSES, Options, lower
from dskc.model import Transformer, get_config

LOWERED = (Op.LINEAR, Op.FP8_LINEAR, Op.MLP, Op.MOE, Op.MLA)


@pytest.fixture(scope="module")
def tiny_meta():
    return Transformer(get_config("tiny"), attn_impl="naive", device="meta")


def test_regions_of_tiny(tiny_meta):
    g = find_regions(tiny_meta)
    ops = collections.Counter(n.op for n in g.nodes)
    cfg = get_config("tiny")
    assert ops[Op.MLA] == cfg.n_layers
    assert ops[Op.MOE] == cfg.n_layers - cfg.n_dense_layers
    assert ops[Op.MLP] == cfg.n_dense_layers
    # per layer: wq_a, wq_b, wkv_a, wkv_b, wo (FP8) ; plus the bf16 head
    assert ops[Op.FP8_LINEAR] == 5 * cfg.n_layers and ops[Op.LINEAR] == 1
    assert not any(n.name.startswith("layers.1.ffn.experts") or n.name.endswith("gate") for n in g.nodes)
    moe = next(n for n in g.nodes if n.op is Op.MOE)
    assert moe.attr("top_k") == cfg.n_activated_experts and moe.attr("gate_bias") is True


def test_passes_run_in_order_and_are_dumpable(tiny_meta):
    seen = []
    g = lower(find_regions(tiny_meta), Options(), dump=lambda name, graph: seen.append((name, graph)))
    assert [n for n, _ in seen] == ["capture"] + [n for n, _ in PASSES]
    mla = g.by_op(Op.MLA)
    assert all(n.attr("attn_impl") == "absorb" and n.attr("rewritten") == "naive->absorb" for n in mla)
    assert all(n.attr("prologue") == "rope+kv_norm+cache_write" for n in mla)
    wkv_b = [n for n in g.nodes if n.name.endswith("attn.wkv_b")]
    assert wkv_b and all(n.attr("absorbed_into") for n in wkv_b)
    assert all(n.attr("up_epilogue") == "swiglu_quant" and n.attr("routed_weight") for n in g.by_op(Op.MOE))
    assert "layers.0.attn" in str(g)
    names = {n.name: n for n in g.nodes}
    assert names["layers.0.attn.q_norm"].attr("fused_into") == "layers.0.attn.wq_b"
    assert names["layers.0.attn.wq_b"].attr("prologue") == "rmsnorm_act_quant"


def test_quantize_weights_pass_turns_bf16_linears_fp8():
    m = Transformer(get_config("tiny", dtype="bf16"), device="meta")
    g = lower(find_regions(m), Options(quantize_weights=True))
    assert not g.by_op(Op.LINEAR)  # every input width of tiny is a whole 128-block
    assert all(n.attr("quantized") == "ahead" for n in g.by_op(Op.FP8_LINEAR))


@pytest.mark.parametrize("name", ["tiny", "deepseek-v2-lite"])
def test_every_region_gets_a_kernel(name):
    p = compiler.plan(Transformer(get_config(name), device="meta"), "sm90a")
    assert p.fallbacks == []
    served = {c.region for c in p.choices}
    for n in p.graph.nodes:
        if n.op in LOWERED and not n.attr("absorbed_into"):
            # a node fused into another (tiny's wq_a / wkv_a into its block's GEMM) runs in that node's kernels
            assert (n.attr("fused_into") or n.name) in served, n.name
    assert all(c.source.startswith(("default:sm90", "tuned:")) for c in p.choices)


def test_verifier_catches_broken_graphs():
    n = Node("a", Op.LINEAR, (4, 4), "bf16")
    with pytest.raises(VerifyError, match="duplicate"):
        verify(Graph((n, n)))
    with pytest.raises(VerifyError, match="reason"):
        verify(Graph((Node("f", Op.FALLBACK, (), "bf16"),)))
    with pytest.raises(VerifyError, match="multiple of 128"):
        verify(Graph((Node("q", Op.FP8_LINEAR, (256, 200), "fp8"),)))


def test_unknown_target_and_unrecognisable_model_are_clear_errors(tiny_meta):
    with pytest.raises(ValueError, match="arch"):
        compiler.plan(tiny_meta, "sm75")
    with pytest.raises(ValueError, match="no region"):
        compiler.plan(nn.Sequential(nn.ReLU(), nn.Tanh()), "sm90a")
    with pytest.raises(TypeError, match="nn.Module"):
        compiler.compile(lambda x: x, "sm90a")
