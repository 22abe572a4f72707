"""Lay a recognised region's weights out for dskc's kernels, once, at compile time, from what its family row read
(the spec names every weight's place): [gate; up] stacked per MLP and per expert, experts stacked [E, 2I, H] /
[E, H, I] (transformers 5's tensors used as they are when no cast or quantisation is asked), the router in fp32,
MLA's wkv_b split into the absorbed w_uk / w_uv. Weights stay e4m3 + block scales when they are, are quantised with
DeepSeek's 128x128 recipe when the lowering asked (node attr quantized="ahead"), else cast to the kernels' dot
dtype (`kdtype`: the compute dtype, fp16 for bf16 under Triton's interpreter).
"""
from __future__ import annotations

import torch

from dskc.capture.family import ExpertsSpec, MLASpec, MLPSpec, MoESpec, get
from dskc.capture.family_dskc import weight_of
from dskc.runtime import weights as W


def _dense(m, name: str, quantize: bool, kdtype) -> W.Dense:
    w, s = weight_of(get(m, name))
    return W.dense(w, s, quantize=quantize, kdtype=kdtype)


def linear(m, quantize: bool, kdtype) -> W.Dense:
    w, s = weight_of(m)
    return W.dense(w, s, quantize=quantize, kdtype=kdtype)


def mlp(m, names: tuple, quantize: bool, kdtype) -> W.MLPWeights:
    g, u, d = (_dense(m, n, quantize, kdtype) for n in names)
    return W.mlp(g, u, d)


def experts(m, spec: ExpertsSpec, quantize: bool, kdtype) -> tuple:
    """(w13 [E, 2I, H], its scales or None, w2 [E, H, I], its scales or None)."""
    ex = get(m, spec.path)
    if spec.layout == "list":
        parts = [mlp(e, spec.names, quantize, kdtype) for e in ex]
        w13 = torch.stack([p.up.weight for p in parts]).contiguous()
        w2 = torch.stack([p.down.weight for p in parts]).contiguous()
        if not parts[0].fp8:
            return w13, None, w2, None
        return (w13, torch.stack([p.up.scale for p in parts]).contiguous(), w2,
                torch.stack([p.down.scale for p in parts]).contiguous())
    gu, dn = (getattr(ex, n).detach() for n in spec.names)
    if spec.transposed:
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    if not quantize:   # transformers 5's stacked tensors are the kernels' layout already: no copy unless a cast
        return gu.to(kdtype).contiguous(), None, dn.to(kdtype).contiguous(), None
    w13, s13 = W.stacked(list(gu), [None] * gu.shape[0], quantize=True, kdtype=kdtype)
    w2, s2 = W.stacked(list(dn), [None] * dn.shape[0], quantize=True, kdtype=kdtype)
    return w13, s13, w2, s2


def moe(m, spec: MoESpec, quantize: bool, kdtype) -> W.MoEWeights:
    w13, s13, w2, s2 = experts(m, spec.experts, quantize, kdtype)
    bias = get(m, spec.gate_bias).detach().float().contiguous() if spec.gate_bias else None
    shared = mlp(get(m, spec.shared), spec.shared_names, quantize, kdtype) if spec.shared else None
    gate_w = get(m, spec.shared_gate).weight.detach().float().contiguous() if spec.shared_gate else None
    return W.MoEWeights(get(m, spec.gate).detach().float().contiguous(), bias, w13, s13, w2, s2, shared, gate_w)


def mla(m, spec: MLASpec, kdtype) -> W.MLAWeights:
    """w_uk [H, nope, C] and w_uv [H, v, C] from kv_b [H * (nope + v), C] (dequantised if it is FP8)."""
    kv_b = get(m, spec.names["kv_b"])
    w = kv_b.dense_weight() if hasattr(kv_b, "dense_weight") else kv_b.weight
    w = w.detach().view(spec.heads, spec.nope + spec.v_dim, spec.kv_lora_rank)
    return W.MLAWeights(w[:, :spec.nope].to(kdtype).contiguous(), w[:, spec.nope:].to(kdtype).contiguous())


def layout(m, spec, quantize: bool, kdtype):
    """The weight bundle of region module `m` read as `spec` (MoESpec, MLPSpec or an MLASpec of a foreign MLA)."""
    if isinstance(spec, MoESpec):
        return moe(m, spec, quantize, kdtype)
    if isinstance(spec, MLPSpec):
        return mlp(m, spec.names, quantize, kdtype)
    if isinstance(spec, MLASpec):
        return mla(m, spec, kdtype)
    raise TypeError(f"no weight layout for {type(spec).__name__}")
