"""Rows of the family table for dskc's own model (dskc.model) and the generic leaves (linears, RMSNorm).

dskc's model is one family among the others: its MLA keeps its projections as regions of their own (the passes
fuse and absorb them by name), its MoE folds in the Gate, the experts and the shared experts, and a transformer
block is a region whose parts are regions (where the pre-norms fuse into the FP8 quantisation).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dskc.capture.family import (ExpertsSpec, Family, LinearSpec, Match, MLASpec, MLPSpec, MoESpec, PlainSpec,
                                 Unservable, get)
from dskc.ir.graph import BLOCK_PARTS, Op

FP8_DTYPES = (torch.float8_e4m3fn,)
LINEAR_TYPES = ("Linear", "ColumnParallelLinear", "RowParallelLinear")   # exact names: a subclass may differ


def dtype_name(t: torch.Tensor) -> str:
    if t.dtype in FP8_DTYPES:
        return "fp8"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(t.dtype, str(t.dtype))


def weight_of(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, its 128x128 block scale or None) of a linear module."""
    return lin.weight, getattr(lin, "scale", None)


def read_linear(m: nn.Module) -> LinearSpec:
    w = m.weight
    if getattr(m, "bias", None) is not None:
        raise Unservable("linear with a bias: the GEMM templates have no bias epilogue yet")
    if w.dtype in FP8_DTYPES and getattr(m, "scale", None) is None:
        raise Unservable("fp8 weight without a scale")
    if w.dtype not in FP8_DTYPES + (torch.bfloat16, torch.float16, torch.float32):
        raise Unservable(f"{w.dtype} weight: dskc's GEMMs take e4m3, bf16 or fp16 (fp32 computed in bf16)")
    return LinearSpec(w.shape[0], w.shape[1], dtype_name(w))


def _is_linear(m) -> bool:
    return isinstance(m, nn.Module) and LINEAR.match.test(m)


def read_mlp(m: nn.Module, names=("w1", "w3", "w2")) -> MLPSpec:
    """A SwiGLU MLP whose (gate, up, down) children are `names`, each a bias-free linear of one dtype."""
    lins = [get(m, n) for n in names]
    if not all(_is_linear(x) for x in lins):
        raise Unservable(f"{'/'.join(names)} are not all plain linears")
    specs = [read_linear(x) for x in lins]
    g, u, d = specs
    if (g.out_features, g.in_features) != (u.out_features, u.in_features) or \
            (d.out_features, d.in_features) != (g.in_features, g.out_features) or len({s.dtype for s in specs}) > 1:
        raise Unservable(f"{'/'.join(names)} shapes {[(s.out_features, s.in_features) for s in specs]} / dtypes "
                         "do not form one SwiGLU MLP")
    return MLPSpec(g.in_features, g.out_features, tuple(names), g.dtype)


def read_moe(m: nn.Module) -> MoESpec:
    g = m.gate
    experts = list(m.experts)
    if any(e is None for e in experts):
        raise Unservable("dskc.compile needs all routed experts on this rank (world size 1)")
    mlp = read_mlp(experts[0])
    shared = getattr(m, "shared_experts", None)
    return MoESpec(mlp.dim, mlp.inter, len(experts), g.topk, g.n_groups, g.topk_groups, g.score_func,
                   float(g.route_scale), g.score_func == "sigmoid", "gate.weight",
                   "gate.bias" if g.bias is not None else None, ExpertsSpec("list", "experts", ("w1", "w3", "w2")),
                   "shared_experts" if shared is not None else None, ("w1", "w3", "w2"),
                   read_mlp(shared).inter if shared is not None else 0, None, mlp.dtype)


def read_mla(m: nn.Module) -> MLASpec:
    names = {k: k for k in ("wq", "wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b", "wo") if hasattr(m, k)}
    return MLASpec(m.n_local_heads, m.q_lora_rank, m.kv_lora_rank, m.rope, m.nope, m.v_dim, names, "dskc",
                   float(m.softmax_scale), m.attn_impl, "bf16")


def read_rmsnorm(m: nn.Module) -> PlainSpec:
    return PlainSpec(tuple(m.weight.shape))


def read_block(m: nn.Module) -> PlainSpec:
    """A pre-norm residual block (model.Block) whose parts are dskc's RMSNorms, its MLA and an MLP or MoE."""
    from dskc.capture.families import kind_of
    parts = (kind_of(m.attn_norm), kind_of(m.attn), kind_of(m.ffn_norm), kind_of(m.ffn))
    if parts[0] != ("dskc.rmsnorm", True) or parts[2] != ("dskc.rmsnorm", True) or parts[1] != ("dskc.mla", True) \
            or parts[3] not in (("dskc.mlp", True), ("dskc.moe", True)):
        raise Unservable(f"block parts {parts} are not dskc's RMSNorm / MLA / MLP or MoE")
    return PlainSpec(("T", m.attn_norm.weight.shape[0]))


LINEAR = Family("linear", Op.LINEAR, Match(types=LINEAR_TYPES, params=(("weight", 2),), leaf=True), read_linear)
RMSNORM = Family("dskc.rmsnorm", Op.RMSNORM, Match(params=(("weight", 1),), attrs=("eps",), leaf=True),
                 read_rmsnorm)
ROWS = (
    Family("dskc.block", Op.BLOCK, Match(children=BLOCK_PARTS), read_block),
    Family("dskc.mla", Op.MLA, Match(children=("wkv_a", "wkv_b", "wo", "kv_norm"), attrs=("attn_impl",)), read_mla),
    Family("dskc.moe", Op.MOE, Match(children=("gate", "experts"), lists=("experts",),
                                     attrs=("gate.topk", "gate.n_groups", "gate.topk_groups", "gate.score_func",
                                            "gate.route_scale")),
           read_moe, covers=("gate", "experts", "shared_experts")),
    Family("dskc.mlp", Op.MLP, Match(types=("MLP",), children=("w1", "w2", "w3")), read_mlp,
           covers=("w1", "w2", "w3")),
)
