"""Find the regions dskc lowers in a model's module tree, through the family table (dskc.capture.families).

The walk visits modules in definition order; the first table row matching a module makes it a region (an IR node
built from the row's spec) and the children the row covers (a MoE's router, experts and shared experts; an MLA's
absorbed kv_b) are never regions of their own. A module of a known family with a setting the kernels do not serve
becomes a FALLBACK node with the reason, and its children stay eager too (never half-lowered). Anything no row
matches stays as it is and runs as eager PyTorch (or Inductor under torch.compile).
"""
from __future__ import annotations

import torch.nn as nn

from dskc.capture.family import LinearSpec, MLASpec, MLPSpec, MoESpec, PlainSpec, Unservable
from dskc.capture.families import classify
from dskc.ir.graph import Graph, Node, Op, verify

LOWERABLE = (Op.LINEAR, Op.FP8_LINEAR, Op.MOE, Op.MLA, Op.MLP)


def _attrs(family, **kw) -> tuple:
    return tuple(sorted({"family": family.name, **kw}.items()))


def node_of(path: str, family, spec) -> Node:
    """The IR node of region `path` read by `family` as `spec` (an Unservable: a FALLBACK node with its reason)."""
    if isinstance(spec, Unservable):
        return Node(path, Op.FALLBACK, (), "-", _attrs(family, kind=family.kind.value, reason=str(spec)))
    if isinstance(spec, LinearSpec):
        op = Op.FP8_LINEAR if spec.dtype == "fp8" else Op.LINEAR
        return Node(path, op, (spec.out_features, spec.in_features), spec.dtype, _attrs(family))
    if isinstance(spec, MLPSpec):
        return Node(path, Op.MLP, (spec.inter, spec.dim), spec.dtype, _attrs(family))
    if isinstance(spec, MoESpec):
        return Node(path, Op.MOE, ("T", spec.dim, spec.inter), spec.dtype, _attrs(
            family, n_experts=spec.n_experts, top_k=spec.top_k, n_groups=spec.n_groups, topk_groups=spec.topk_groups,
            score_func=spec.score_func, route_scale=spec.route_scale, gate_bias=spec.gate_bias is not None,
            renorm=spec.renorm, shared=spec.shared is not None, shared_inter=spec.shared_inter,
            shared_gate=spec.shared_gate is not None, experts_layout=spec.experts.layout))
    if isinstance(spec, MLASpec):
        return Node(path, Op.MLA, ("B", "S", spec.heads, spec.kv_lora_rank + spec.rope_dim), spec.dtype, _attrs(
            family, attn_impl=spec.attn_impl, heads=spec.heads, kv_lora_rank=spec.kv_lora_rank, rope=spec.rope_dim,
            nope=spec.nope, v_dim=spec.v_dim, rope_layout=spec.rope))
    if isinstance(spec, PlainSpec):
        return Node(path, family.kind, spec.shape, spec.dtype, _attrs(family))
    raise TypeError(f"{path}: no IR node for {type(spec).__name__}")


def covered_children(family, spec, m: nn.Module) -> list[str]:
    """The children of region `m` that are never regions of their own: those its row folds in, and every child of
    a MoE or MLP it cannot serve (never half-lowered: they stay eager with it). An attention's projections are
    regions of their own either way."""
    if isinstance(spec, Unservable) and family.kind in (Op.MOE, Op.MLP):
        return [c for c, _ in m.named_children()]
    return list(family.covers)


def walk(model: nn.Module):
    """(path, module, row, spec or Unservable) of every region, in definition order."""
    covered = []
    for name, m in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        got = classify(m)
        if got is None:
            continue
        family, spec = got
        if isinstance(spec, Unservable) and family.kind is Op.BLOCK:   # a block is only where its parts' work
            continue                                                     # fuses: its parts go on as they are
        yield name, m, family, spec
        covered.extend(f"{name}.{c}" if name else c for c in covered_children(family, spec, m))


def find_regions(model: nn.Module) -> Graph:
    """The IR graph of recognised regions (FALLBACK nodes for those of a known family dskc cannot serve)."""
    nodes = [node_of(name, family, spec) for name, _, family, spec in walk(model)]
    if not any(n.op in LOWERABLE for n in nodes):
        left = [f"{n.name} ({n.attr('family')}): {n.attr('reason')}" for n in nodes if n.op is Op.FALLBACK]
        raise ValueError(f"dskc found no region it can lower in {type(model).__name__} (no linear, MLP, MoE or "
                         "MLA block of a family it serves" + (f"; recognised but not served: {left[:4]}" if left
                                                               else "") +
                         "); run it without dskc, or with torch.compile's default backend")
    return verify(Graph(tuple(nodes)))
